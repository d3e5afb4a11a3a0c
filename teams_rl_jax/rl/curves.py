"""The policy stage's curves: per-update rows (``curves*.jsonl``), operation histograms, the
summary of a run, and their plots (``curves.png``, ``op_histogram.png``).

Rows are JSON-ready dicts built from the stacked ``make_train`` metrics; everything here is host-side
numpy and files, nothing is traced.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from teams_rl_jax.layout import PolicyDir
from teams_rl_jax.rl.config import STOP, PolicyConfig


def _pyplot():
    import matplotlib  # heavy: imported only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve_rows(metrics: dict, config: PolicyConfig, names: list[str]) -> list[dict]:
    """JSON-ready rows (one per update) from stacked ``make_train`` metrics; ``names``: the env's ops."""
    episodes_per_update = config.num_envs
    rows, cum = [], 0.0
    for i in range(len(metrics["return"])):
        q_total = float(metrics["queries_total"][i])
        cum += q_total * episodes_per_update
        row = {
            "update": i + 1,
            "episodes": (i + 1) * episodes_per_update,
            "return": float(metrics["return"][i]),
            "episode_length": float(metrics["episode_length"][i]),
            "queries": {k: float(v[i]) for k, v in metrics["queries"].items()},
            "queries_total": q_total,
            "cumulative_queries": cum,
            "cost": float(metrics["cost"][i]),
            "lagrange": float(metrics["lagrange"][i]),
        }
        for k in ("kl", "policy_loss", "value_loss", "entropy", "linesearch_accepted", "clip_fraction"):
            if k in metrics:
                row[k] = float(metrics[k][i])
        row["op_histogram"] = {n: float(x) for n, x in zip(names, metrics["op_histogram"][i])}
        # The reference's cost, 1 per operation applied (``stop`` is free), beside our per-role queries.
        row["paper_cost"] = row["episode_length"] * (1.0 - row["op_histogram"].get(STOP, 0.0))
        row["eliminated"] = {k: float(v[i]) for k, v in metrics.get("eliminated", {}).items()}
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def op_histograms(metrics: dict, names: list[str]) -> dict:
    weights = metrics["episode_length"][:, None]
    total = (metrics["op_histogram"] * weights).sum(0) / max(float(weights.sum()), 1e-9)
    return {
        "total": dict(zip(names, map(float, total))),
        "final": dict(zip(names, map(float, metrics["op_histogram"][-1]))),
        "final_by_step": [dict(zip(names, map(float, row))) for row in metrics["op_by_step"][-1]],
    }


def plot_curves(path: Path, runs: dict[str, list[dict]], budget: float | None = None) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    # An env that charges no queries (token edits) is compared at equal episode counts instead.
    by_queries = any(r["cumulative_queries"] > 0 for rows in runs.values() for r in rows)
    xkey = "cumulative_queries" if by_queries else "episodes"
    for name, rows in runs.items():
        cum = [r[xkey] for r in rows]
        upd = [r["update"] for r in rows]
        style = "-" if name == "policy" else "--"
        axes[0, 0].plot(cum, [r["return"] for r in rows], style, label=name)
        axes[0, 1].plot(upd, [r["queries_total"] for r in rows], style, label=name)
        if name == "policy":
            axes[1, 0].plot(upd, [r.get("kl", 0.0) for r in rows], label="KL")
        axes[1, 1].plot(upd, [r.get("entropy", 0.0) for r in rows], style, label=name)
    axes[0, 0].set(xlabel="cumulative queries" if by_queries else "episodes (no queries charged)",
                   ylabel="mean episode return", title="reward at equal budgets")
    if budget is not None:
        pol = runs["policy"]
        axes[0, 1].plot([r["update"] for r in pol], [r["cost"] for r in pol], ":", label="policy (budgeted roles)")
        axes[0, 1].axhline(budget, color="k", lw=0.8, label="budget")
    axes[0, 1].set(xlabel="update", ylabel="queries / episode", title="cost")
    axes[1, 0].set(xlabel="update", ylabel="mean KL(old || new)", title="policy step size")
    axes[1, 1].set(xlabel="update", ylabel="entropy", title="acting entropy")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_histogram(path: Path, hists: dict[str, dict]) -> None:
    plt = _pyplot()
    names = list(next(iter(hists.values()))["total"])
    x = np.arange(len(names))
    width = 0.8 / max(len(hists), 1)
    fig, ax = plt.subplots(figsize=(10, 4))
    for i, (run, h) in enumerate(hists.items()):
        ax.bar(x + i * width, [h["total"][n] for n in names], width, label=run)
    ax.set_xticks(x + 0.4 - width / 2, names, rotation=20, ha="right")
    ax.set(ylabel="fraction of steps", title="operation histogram (whole run)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarize(rows: list[dict], num_updates: int) -> dict:
    """Final (mean over the last 10% of updates) and mean return, queries and episodes of one run; run
    totals of the reference's cost (``paper_cost``) and of eliminated steps by reason (``eliminated``,
    ``truncated`` among them on the LLM env)."""
    tail = max(1, num_updates // 10)
    episodes = [r["episodes"] - (rows[i - 1]["episodes"] if i else 0) for i, r in enumerate(rows)]
    reasons = sorted({k for r in rows for k in r.get("eliminated", {})})
    return {
        # totals over the run: the reference's cost (1 per operation applied) and eliminated steps by reason
        "paper_cost": float(sum(r["paper_cost"] * e for r, e in zip(rows, episodes))),
        "eliminated": {k: float(sum(r["eliminated"].get(k, 0.0) * e for r, e in zip(rows, episodes)))
                       for k in reasons},
        "final_return": float(np.mean([x["return"] for x in rows[-tail:]])),
        "mean_return": float(np.mean([x["return"] for x in rows])),
        "final_queries_per_episode": float(np.mean([x["queries_total"] for x in rows[-tail:]])),
        "total_queries": rows[-1]["cumulative_queries"],
        "episodes": rows[-1]["episodes"],
    }


def write_comparison(pdir: PolicyDir, rows: dict[str, list[dict]], hists: dict[str, dict],
                     budget: float | None = None) -> None:
    """``op_histogram.json`` and the plots comparing the policy (``rows["policy"]``) with the baselines."""
    pdir.op_histogram.write_text(json.dumps(hists, indent=2))
    plot_curves(pdir.curves_png, rows, budget)
    plot_histogram(pdir.op_histogram_png, hists)
