"""Render the eval report: ``report.md`` (tables) + PNG plots + ``report.json``, from one dict.

Byte-identical regeneration from the same inputs (a test checks it): the JSON is written with sorted
keys and no timestamps or absolute paths; figures use the Agg backend, a fixed size/DPI, fixed
fonts/hash salt, and PNG metadata with the ``Software`` entry removed (matplotlib writes no date into
PNGs, but its version string would make reports differ across installs); datasets are in input order.

:func:`write_report` takes the dict :func:`teams_rl_jax.eval.stage.build_report` assembles::

    {"datasets": [dataset_stats, ...],            # first = the run's dataset, then the compared ones
     "policy_curves": {name: [[x, return], ...]}, "policy_curves_x": "cumulative queries" | "episodes",
     "benchmarks": {task: {acc, acc_norm?, n}},    # optional
     "mia": {"loss": {...}, "reference": {...}},   # optional
     "notes": [str, ...]}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

PNG_METADATA = {"Software": None}
DPI = 100


def _mpl():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "teams-rl-jax", "font.family": "DejaVu Sans", "figure.dpi": DPI,
                         "path.simplify": False})
    return plt


def save_figure(fig, path: str | Path) -> None:
    """Save a figure as a reproducible PNG and close it."""
    plt = _mpl()
    fig.savefig(str(path), format="png", dpi=DPI, metadata=PNG_METADATA)
    plt.close(fig)


def dumps(obj: Any) -> str:
    """The canonical JSON text of the report (sorted keys, fixed float repr)."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=True) + "\n"


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return out + [""]


# ---- plots ------------------------------------------------------------------------------------------------
def _bars(ax, groups: list[str], series: dict[str, list[float]], ylabel: str) -> None:
    n = max(1, len(series))
    width = 0.8 / n
    x = np.arange(len(groups))
    for k, (name, vals) in enumerate(series.items()):
        ax.bar(x + (k - (n - 1) / 2) * width, vals, width, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


def plot_lengths(path: Path, datasets: list[dict]) -> None:
    plt = _mpl()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("instruction", "answer")):
        bins = datasets[0]["lengths"][kind]["bins"]
        groups = [f"{a}-{b}" for a, b in zip(bins, bins[1:])] + [f"{bins[-1]}+"]
        series = {d["name"]: [h / max(1, d["size"]) for h in d["lengths"][kind]["hist"]] for d in datasets}
        _bars(ax, groups, series, "fraction of records")
        ax.set_title(f"{kind} length (words)")
    fig.tight_layout()
    save_figure(fig, path)


def plot_diversity(path: Path, datasets: list[dict]) -> None:
    plt = _mpl()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    groups = [f"{k} d-{n}" for k in ("instr", "answer") for n in (1, 2, 3)]
    series = {d["name"]: [d["distinct"][k][f"distinct_{n}"] for k in ("instruction", "answer") for n in (1, 2, 3)]
              for d in datasets}
    _bars(axes[0], groups, series, "distinct n-grams / n-grams")
    axes[0].set_title("distinct-n")
    ax = axes[1]
    for d in datasets:
        e = d.get("embedding_diversity")
        if e:
            w = e["bin_width"]
            centers = np.arange(len(e["per_record_hist"])) * w + w / 2
            frac = np.asarray(e["per_record_hist"], float) / max(1, e["sample"])
            ax.plot(centers, frac, marker="o", ms=3,
                    label=f"{d['name']} (mean {e['mean_pairwise_cosine_distance']:.3f})")
    ax.set_xlabel("mean cosine distance to the other instructions (MiniLM)")
    ax.set_ylabel("fraction of records")
    ax.set_title("embedding diversity")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def plot_ops(path: Path, datasets: list[dict]) -> None:
    plt = _mpl()
    names = sorted({op for d in datasets for op in d["ops"]["kept_records"]})
    fig, ax = plt.subplots(figsize=(8, 4))
    series = {}
    for d in datasets:
        h = d["ops"]["kept_records"]
        tot = max(1, sum(h.values()))
        series[d["name"]] = [h.get(n, 0) / tot for n in names]
    if names:
        _bars(ax, names, series, "fraction of operations in kept records")
    ax.set_title("operation histogram")
    fig.tight_layout()
    save_figure(fig, path)


def plot_curves(path: Path, curves: dict[str, list[list[float]]], xlabel: str) -> None:
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        a = np.asarray(pts, float)
        if len(a):
            ax.plot(a[:, 0], a[:, 1], label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean episode return")
    ax.set_title("reward vs queries")
    if curves:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# ---- markdown ---------------------------------------------------------------------------------------------
def plot_roc(path: str | Path, attacks: dict[str, dict], title: str = "membership inference") -> None:
    """ROC curves of several attacks (``{name: attack_metrics(...)}``), log-log like Carlini et al. too."""
    plt = _mpl()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for name, m in sorted(attacks.items()):
        for ax in axes:
            ax.plot(m["roc"]["fpr"], m["roc"]["tpr"], label=f"{name} (AUC {m['auc']:.3f})")
    for ax in axes:
        ax.plot([1e-4, 1], [1e-4, 1], "k:", lw=0.8)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlim(1e-3, 1)
    axes[1].set_ylim(1e-3, 1)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def _decontamination_md(d: dict) -> list[str]:
    lines = ["## Decontamination", "",
             f"{d['contaminated_records']} of {d['records']} generated records share at least one {d['n']}-gram "
             f"({d['normalisation']}) of {', '.join(d['fields'])} with a benchmark's questions or choices.", ""]
    lines += _table(["task", "docs", "benchmark n-grams", "contaminated records", "overlapping n-grams"],
                    [[t, b["docs"], b["benchmark_ngrams"], b["contaminated_records"], b["overlapping_ngrams"]]
                     for t, b in d["benchmarks"].items()])
    examples = [(t, e) for t, b in d["benchmarks"].items() for e in b["examples"][:3]]
    if examples:
        lines += ["Examples (first 3 per task):", ""]
        lines += _table(["task", "record", "seed", "field", "n-gram", "benchmark doc"],
                        [[t, e["record"], e["seed_id"], e["field"], e["ngram"], e["benchmark_doc"]]
                         for t, e in examples])
    return lines


def render_markdown(rep: dict, plots: list[str]) -> str:
    ds = rep.get("datasets", [])
    lines = ["# TeaMs-RL eval report", ""]
    for note in rep.get("notes", []):
        lines.append(f"- {note}")
    if rep.get("notes"):
        lines.append("")
    if ds:
        lines += ["## Datasets", ""]
        lines += _table(
            ["dataset", "records", "queries", "queries / kept", "instr. words", "answer words", "distinct-1/2/3 (instr.)",
             "distinct-1/2/3 (answer)", "MiniLM diversity", "complexity"],
            [[d["name"], d["size"], d["queries_total"], d["queries_per_kept"], d["lengths"]["instruction"]["mean"],
              d["lengths"]["answer"]["mean"],
              "/".join(_fmt(d["distinct"]["instruction"][f"distinct_{n}"]) for n in (1, 2, 3)),
              "/".join(_fmt(d["distinct"]["answer"][f"distinct_{n}"]) for n in (1, 2, 3)),
              (d.get("embedding_diversity") or {}).get("mean_pairwise_cosine_distance"), d["complexity"]["total"]]
             for d in ds])
        roles = sorted({r for d in ds for r in d["queries"]})
        lines += ["### Queries by role", ""]
        lines += _table(["dataset"] + roles + ["total", "per kept", "source"],
                        [[d["name"]] + [d["queries"].get(r, 0) for r in roles]
                         + [d["queries_total"], d["queries_per_kept"], d["queries_source"]] for d in ds])
        rules = sorted({r for d in ds for r in d.get("eliminations", {})})
        if rules:
            lines += ["### Eliminations by rule", ""]
            lines += _table(["dataset"] + rules + ["duplicates (exact/near)"],
                            [[d["name"]] + [d.get("eliminations", {}).get(r, 0) for r in rules]
                             + ["/".join(str(d.get("duplicates", {}).get(k, 0)) for k in ("exact", "near"))]
                             for d in ds])
        ops = sorted({o for d in ds for o in d["ops"]["kept_records"]})
        if ops:
            lines += ["### Operations in kept records", ""]
            lines += _table(["dataset"] + ops + ["mean chain"],
                            [[d["name"]] + [d["ops"]["kept_records"].get(o, 0) for o in ops]
                             + [d["ops"]["mean_chain_length"]] for d in ds])
        keys = [k for k in ds[0]["complexity"] if k not in ("hist", "total")]
        lines += ["### Complexity (mean per instruction, the env's measures)", ""]
        lines += _table(["dataset"] + keys, [[d["name"]] + [d["complexity"][k] for k in keys] for d in ds])
    if rep.get("benchmarks"):
        lines += ["## Benchmarks", ""]
        lines += _table(["task", "n", "acc", "acc_stderr", "acc_norm"],
                        [[t, r["n"], r["acc"], r["acc_stderr"], r.get("acc_norm")]
                         for t, r in sorted(rep["benchmarks"].items())])
    if rep.get("decontamination"):
        lines += _decontamination_md(rep["decontamination"])
    if rep.get("mia"):
        m = rep["mia"]
        lines += ["## Membership inference", ""]
        for note in m.get("notes", []):
            lines += [f"- {note}"]
        lines += [""] if m.get("notes") else []
        lines += _table(["attack", "members", "non-members", "ROC AUC", "TPR @ 1% FPR"],
                        [[k, v["members"], v["non_members"], v["auc"], v["tpr_at_1pct_fpr"]]
                         for k, v in sorted(m.items()) if isinstance(v, dict) and "auc" in v])
    if rep.get("policy_summary"):
        lines += ["## Policy stage", ""]
        lines += _table(["run", "final return", "mean return", "total queries"],
                        [[k, v.get("final_return"), v.get("mean_return"), v.get("total_queries")]
                         for k, v in rep["policy_summary"].items()])
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(out_dir: str | Path, rep: dict) -> dict[str, Path]:
    """Write report.json, the PNGs and report.md into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    ds = rep.get("datasets", [])
    plots = []
    if ds:
        for name, fn in (("lengths", plot_lengths), ("diversity", plot_diversity), ("ops", plot_ops)):
            fn(out / f"{name}.png", ds)
            plots.append(f"{name}.png")
    if rep.get("policy_curves"):
        plot_curves(out / "reward_vs_queries.png", rep["policy_curves"], rep.get("policy_curves_x", "queries"))
        plots.append("reward_vs_queries.png")
    if rep.get("mia"):
        attacks = {k: v for k, v in rep["mia"].items() if isinstance(v, dict) and "roc" in v}
        if attacks:
            plot_roc(out / "roc.png", attacks)
            plots.append("roc.png")
    (out / "report.json").write_text(dumps(rep))
    (out / "report.md").write_text(render_markdown(rep, plots))
    for p in ["report.json", "report.md"] + plots:
        paths[p] = out / p
    return paths
