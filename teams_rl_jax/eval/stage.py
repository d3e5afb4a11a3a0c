"""The pipeline's eval stage: ``run_eval_stage(cfg, run_dir)`` -> ``run_dir/eval/`` (report.md, report.json, PNGs).

Reads only earlier stages' artifacts: ``run/data/generated.jsonl`` + ``summary.json`` (and each
``run/data/baselines/<name>/``), ``run/policy/curves*.jsonl``, and the SFT export ``run/sft/hf``.
Parts whose inputs are missing are skipped with a log line (e.g. no SFT export -> no MIA).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from teams_rl_jax.eval.config import EvalConfig


def run_eval_stage(cfg: EvalConfig, run_dir: str | Path, log: Callable[[str], None] = print) -> dict:
    """Run the configured parts and write ``run_dir/eval/``; returns the report dict (= report.json)."""
    run_dir = Path(run_dir)
    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"run_dir": run_dir.name}
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    log(f"[eval] wrote {out}")
    return report
