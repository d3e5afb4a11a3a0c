"""The pipeline's eval stage: ``run_eval_stage(cfg, run_dir)`` -> ``run_dir/eval/`` (report.md, report.json, PNGs).

Reads only earlier stages' artifacts and skips (with a log line and a note in the report) any part
whose inputs are missing:

* dataset report: ``run/data/generated.jsonl`` + ``summary.json``, side by side with each
  ``run/data/baselines/<name>/`` of ``report.compare`` (``random`` = random Evol-Instruct at the same
  seeds and query budget, ``paper`` = the paper's schedule);
* policy curves: ``run/policy/curves.jsonl`` and ``curves_<baseline>.jsonl`` (reward vs cumulative
  queries; vs episodes when the env spends no queries, as the offline token-edit env does);
* MIA on the SFT export ``run/sft/hf`` (see :class:`~teams_rl_jax.eval.config.MIASection` for the
  member / non-member choice);
* benchmarks when ``benchmarks.data_dir`` is set, and then always the decontamination report of
  ``run/data/generated.jsonl`` against every task found there (``decontamination`` in report.json, a
  section of report.md; :mod:`teams_rl_jax.eval.decontaminate`);
* the dataset browser ``eval/browse.html`` from ``data/trace.jsonl`` and the baselines' traces, with the
  report's PNGs (:mod:`teams_rl_jax.eval.browse`), when a trace is there.

With ``checkpoint: auto`` the results also go into the run's SFT export's model card
(``sft/hf/README.md``, outside the export's digest: the card's update leaves every stage up to date).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from teams_rl_jax.data.readers import read_dataset
from teams_rl_jax.errors import DataError
from teams_rl_jax.eval.browse import write_browse
from teams_rl_jax.eval.config import EvalConfig
from teams_rl_jax.eval.dataset_report import dataset_stats
from teams_rl_jax.eval.decontaminate import decontamination_report
from teams_rl_jax.eval.mia import disjoint, run_mia
from teams_rl_jax.eval.multiple_choice import build_mesh, evaluate_checkpoint
from teams_rl_jax.eval.report import write_report
from teams_rl_jax.layout import PolicyDir, RunLayout
from teams_rl_jax.models.encoder import load_encoder
from teams_rl_jax.sft.loop import DEMO_DATA
from teams_rl_jax.sft.model_card import update_card_with_eval


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def policy_curves(policy_dir: Path) -> tuple[dict[str, list[list[float]]], str, dict]:
    """``({run: [[x, return], ...]}, x label, summary)`` from the policy stage's curves files."""
    pol = PolicyDir(Path(policy_dir))
    curves: dict[str, list[dict]] = {}
    if pol.curves().is_file():
        curves["policy"] = _read_jsonl(pol.curves())
    for p in sorted(pol.root.glob(pol.curves("*").name)):
        curves[p.stem[len("curves_"):]] = _read_jsonl(p)
    use_queries = any(r.get("cumulative_queries", 0) > 0 for rows in curves.values() for r in rows)
    key = "cumulative_queries" if use_queries else "episodes"
    pts = {k: [[float(r.get(key, i + 1)), float(r["return"])] for i, r in enumerate(rows)] for k, rows in curves.items()}
    summary = {}
    if pol.summary.is_file():
        s = json.loads(pol.summary.read_text())
        summary = {"policy": s.get("policy", {}), **{k: v for k, v in (s.get("baselines") or {}).items()}}
    return pts, ("cumulative queries" if use_queries else "episodes (the env spent no queries)"), summary


def dataset_reports(datasets: list[tuple[str, Path, Path | None]], *, encoder: str | None, diversity_max: int,
                    seed: int, log: Callable[[str], None]) -> list[dict]:
    """:func:`dataset_stats` of each ``(name, records path, summary path)`` with one shared encoder."""
    enc = None
    if encoder != "none":
        enc = load_encoder(encoder)
    out = []
    for name, path, summary in datasets:
        out.append(dataset_stats(path, summary=summary, encoder=enc, diversity_max=diversity_max, seed=seed,
                                 name=name))
        log(f"[eval] dataset {name}: {out[-1]['size']} records, {out[-1]['queries_total']} queries")
    return out


def sft_data_settings(run_dir: Path) -> dict:
    """``sft.data`` of the run's resolved ``config.yaml`` (what the SFT stage trained on), or {}."""
    import yaml

    p = RunLayout(run_dir).config
    if not p.is_file():
        return {}
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError:
        return {}
    sft = data.get("sft") if isinstance(data, dict) else None
    return dict(sft.get("data") or {}) if isinstance(sft, dict) else {}


def mia_inputs(cfg: EvalConfig, run_dir: Path) -> tuple[list, list, list[str]]:
    """(members, non-members, notes) for the stage's MIA (see ``MIASection``)."""
    run = RunLayout(run_dir)
    notes = []
    if cfg.mia.members != "auto":
        members = read_dataset(cfg.mia.members)
        notes.append(f"members: {Path(cfg.mia.members).name}")
    else:
        sft_path = sft_data_settings(run_dir).get("path", "auto")
        gen = run.data.records
        if sft_path not in (None, "auto"):  # the SFT stage was pointed at another dataset
            members = read_dataset(sft_path, sft_data_settings(run_dir).get("format", "auto"))
            notes.append(f"members: the SFT training set ({Path(str(sft_path)).name}, from config.yaml)")
        else:
            members = read_dataset(gen if gen.is_file() else DEMO_DATA)
            notes.append("members: the SFT training set "
                         f"({'data/generated.jsonl' if gen.is_file() else 'bundled demo set'})")
    if cfg.mia.non_members != "auto":
        non = disjoint(read_dataset(cfg.mia.non_members), members)
        notes.append(f"non-members: {Path(cfg.mia.non_members).name}")
    else:
        non, used = [], []
        for name in cfg.report.compare:
            p = run.data.baseline(name).records
            if p.is_file():
                non += disjoint(read_dataset(p), members + non)
                used.append(f"baselines/{name}")
        if len(non) < 2:
            non += disjoint(read_dataset(DEMO_DATA), members + non)
            used.append("bundled demo set")
        notes.append(f"non-members: records of {', '.join(used)} not in the training set")
    return members, non, notes


def run_eval_stage(cfg: EvalConfig, run_dir: str | Path, log: Callable[[str], None] = print) -> dict:
    """Run the configured parts and write ``run_dir/eval/``; returns the report dict (= report.json)."""
    run_dir = Path(run_dir)
    run = RunLayout(run_dir)
    out = run.eval.root
    out.mkdir(parents=True, exist_ok=True)
    rep: dict = {"notes": []}

    if cfg.report.enabled:
        sets = []
        if run.data.records.is_file():
            sets.append(("generated", run.data.records, run.data.summary))
        for name in cfg.report.compare:
            b = run.data.baseline(name)
            if b.records.is_file():
                sets.append((name, b.records, b.summary))
        if sets:
            rep["datasets"] = dataset_reports(sets, encoder=cfg.report.encoder, diversity_max=cfg.report.diversity_max,
                                              seed=cfg.report.seed, log=log)
            missing = [n for n in cfg.report.compare if n not in {s[0] for s in sets}]
            if missing:
                rep["notes"].append(f"no baseline dataset for {', '.join(missing)} in data/baselines/")
        else:
            rep["notes"].append("no generated dataset in data/: dataset report skipped")
        curves, xlabel, psummary = policy_curves(run.policy.root)
        if curves:
            rep["policy_curves"], rep["policy_curves_x"] = curves, xlabel
        if psummary:
            rep["policy_summary"] = psummary

    checkpoint = Path(cfg.checkpoint) if cfg.checkpoint != "auto" else run.sft.hf
    have_ckpt = (checkpoint / "config.json").is_file()
    if cfg.mia.enabled:
        if have_ckpt:
            members, non, notes = mia_inputs(cfg, run_dir)
            if not non:
                raise DataError("membership inference: no non-member records (set eval.mia.non_members)")
            sft = sft_data_settings(run_dir)
            template = cfg.mia.template if cfg.mia.template != "auto" else sft.get("template", "alpaca")
            max_seq_len = cfg.mia.max_seq_len or int(sft.get("max_seq_len") or 256)
            rep["mia"] = run_mia(checkpoint, members, non, reference=cfg.mia.reference, template=template,
                                 max_seq_len=max_seq_len, max_examples=cfg.mia.max_examples,
                                 batch_size=cfg.mia.batch_size, log=log)
            rep["mia"]["notes"] = notes
        else:
            where = "sft/hf" if cfg.checkpoint == "auto" else str(checkpoint)
            rep["notes"].append(f"no checkpoint at {where}: membership inference skipped")
    b = cfg.benchmarks
    if b.data_dir is not None:
        if run.data.records.is_file():
            rows = _read_jsonl(run.data.records)
            rep["decontamination"], bad = decontamination_report(rows, b.data_dir, b.decontaminate_n)
            log(f"[eval] decontamination: {len(bad)} of {len(rows)} generated records share a "
                f"{b.decontaminate_n}-gram with a benchmark")
        else:
            rep["notes"].append("no generated dataset in data/: decontamination skipped")
        if not have_ckpt:
            raise DataError(f"benchmarks: checkpoint not found: {checkpoint} (no config.json)")
        res = evaluate_checkpoint(str(checkpoint), b.data_dir, b.tasks, limit=b.limit, batch_size=b.batch_size,
                                  max_length=b.max_length, dtype=b.dtype,
                                  mesh=build_mesh(b.mesh_data, b.mesh_fsdp, b.mesh_tensor), log=log)
        run.eval.benchmarks_per_doc.write_text(json.dumps({t: r["docs"] for t, r in res.items()}, sort_keys=True))
        rep["benchmarks"] = {t: {k: v for k, v in r.items() if k != "docs"} for t, r in res.items()}
    else:
        rep["notes"].append("benchmarks skipped (set eval.benchmarks.data_dir to a local benchmark dir)")

    write_report(out, rep)
    log(f"[eval] wrote {run.eval.report_md}")
    base = run.data.baselines
    traces = [run.data.trace] + ([run.data.baseline(d.name).trace for d in sorted(base.iterdir()) if d.is_dir()]
                                 if base.is_dir() else [])
    page = write_browse(traces, run.eval.browse, plots_dir=out)
    if page:
        log(f"[eval] dataset browser: {page['steps']} steps of {page['seeds']} seeds -> {run.eval.browse}")
    if cfg.checkpoint == "auto" and update_card_with_eval(run.sft.model_card, rep):
        log(f"[eval] results added to the model card {run.sft.model_card}")
    return rep
