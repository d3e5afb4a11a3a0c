"""The experiment's ``report.json``, ``report.md`` and ``roc.png`` from the arms' own outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from teams_rl_jax.data.tokenizer import load_tokenizer
from teams_rl_jax.eval.report import plot_roc
from teams_rl_jax.layout import RunLayout

OFFLINE_NOTE = "These numbers show the machinery at tiny scale, not the paper's result."


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def dataset_tokens(records: Path, tokenizer_dir: Path, batch: int = 1024) -> int:
    """Tokens of every generated record (instruction + input + output) in the arm's SFT tokenizer: the
    dataset's size beside its record count (the paper's "6.75% of its size")."""
    tok = load_tokenizer(str(tokenizer_dir))
    texts = [" ".join(r.get(k) or "" for k in ("instruction", "input", "output"))
             for r in map(json.loads, filter(str.strip, records.read_text().splitlines()))]
    total = 0
    for i in range(0, len(texts), batch):
        total += sum(len(ids) for ids in tok(texts[i:i + batch], add_special_tokens=False)["input_ids"])
    return total


def arm_row(exp: Path, arm: Path) -> dict:
    """One arm's figures: generation queries (issued, paid, by role), records, reviewer verdicts, MIA, export."""
    lay = RunLayout(arm)
    s, ev = _json(lay.data.summary), _json(lay.eval.report_json)
    by_role = {r: q for r, q in s.get("queries", {}).items() if q}
    reviewer = s.get("queries", {}).get("reviewer", 0)
    loss = (ev.get("mia") or {}).get("loss") or {}
    return {
        "queries": int(s.get("queries_total", 0)),
        "queries_paid": int(sum(s.get("paid", {}).values())),
        "queries_by_role": by_role,
        "records": int(s.get("kept", 0)),
        "tokens": dataset_tokens(lay.data.records, lay.sft.hf),
        # the reviewer's "Not Equal" share: its answers that did not eliminate a rewrite as no gain
        "not_equal_rate": 1.0 - s["eliminated"]["no_gain"] / reviewer if reviewer else None,
        "mia_auc": loss.get("auc"),
        "mia_tpr_at_1pct_fpr": loss.get("tpr_at_1pct_fpr"),
        "members": sum(1 for _ in open(lay.data.root / "members.jsonl")),
        "non_members": sum(1 for _ in open(lay.data.root / "non_members.jsonl")),
        "sft_export": lay.sft.hf.relative_to(exp).as_posix(),
        "benchmarks": {t: r.get("acc", r) for t, r in (ev.get("benchmarks") or {}).items()},
    }


def to_markdown(rep: dict, offline: bool) -> str:
    """The arms side by side (and the wizardlm arm's ratios to the policy arm)."""
    lines = ["# TeaMs-RL experiment", ""]
    if offline:
        lines += [OFFLINE_NOTE, ""]
    lines += [f"Equal budget (policy, random, fixed): {rep['budget']} generation queries. Seeds: "
              f"{rep['seeds']['members']} members, {rep['seeds']['non_members']} non-members. "
              f"Policy stage's training queries (separate): {rep['policy_stage_queries']}.", "",
              "| arm | queries | paid | by role | records | tokens | Not Equal rate | MIA AUC | TPR@1%FPR | SFT export |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for name, a in rep["arms"].items():
        roles = ", ".join(f"{r} {q}" for r, q in a["queries_by_role"].items())
        lines.append(f"| {name} | {a['queries']} | {a['queries_paid']} | {roles} | {a['records']} | {a['tokens']} | "
                     f"{f(a['not_equal_rate'])} | {f(a['mia_auc'])} | {f(a['mia_tpr_at_1pct_fpr'])} | {a['sft_export']} |")
    if rep.get("wizardlm_vs_policy"):
        lines += ["", "wizardlm / policy: " + ", ".join(f"{k} {v:.2f}" for k, v in rep["wizardlm_vs_policy"].items())]
    return "\n".join(lines) + "\n\nROC curves of every arm's loss attack: roc.png\n"


def write_report(cfg: Any, exp: Path, arms: dict[str, Path], split: dict, budget: int | None,
                 log: Callable[[str], None]) -> dict:
    """Write ``report.json``, ``report.md`` and ``roc.png`` into ``exp``; returns the report."""
    rows = {name: arm_row(exp, path) for name, path in arms.items()}
    pol = _json(RunLayout(exp).policy.summary)
    rep = {"arms": rows, "budget": budget,
           "seeds": {"members": len(split["members"]), "non_members": len(split["non_members"])},
           "policy_stage_queries": int((pol.get("policy") or {}).get("total_queries", 0))}
    if "wizardlm" in rows and "policy" in rows:
        w, p = rows["wizardlm"], rows["policy"]
        rep["wizardlm_vs_policy"] = {k: w[k] / p[k] for k in ("queries", "records", "tokens") if p[k]}
    (exp / "report.json").write_text(json.dumps(rep, indent=1, sort_keys=True))
    (exp / "report.md").write_text(to_markdown(rep, cfg.offline_demo))
    rocs = {n: (_json(RunLayout(p).eval.report_json).get("mia") or {}).get("loss") for n, p in arms.items()}
    plot_roc(exp / "roc.png", {n: m for n, m in rocs.items() if m and "roc" in m}, title="membership inference per arm")
    log(f"[experiment] wrote {exp / 'report.md'}, report.json, roc.png")
    return rep
