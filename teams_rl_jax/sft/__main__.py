"""``python -m teams_rl_jax.sft --config configs/sft_tiny.yaml [--run-dir D] [--set key=value ...]``.

The YAML is a pipeline config (``run_dir``, ``distributed`` and an ``sft:`` section; other sections are
ignored) or a bare ``SFTConfig`` (top-level keys model, data, optim, ...). Artifacts go to the config's
``run_dir`` (``--run-dir`` overrides it; ``runs/sft`` when neither names one), laid out as the
pipeline's SFT stage leaves them. ``--set`` keys may omit the ``sft.`` prefix.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Literal, Sequence

from teams_rl_jax import cli
from teams_rl_jax.distributed import maybe_initialize_distributed
from teams_rl_jax.sft.config import SFTConfig
from teams_rl_jax.sft.loop import train

TOP = ("run_dir", "distributed")  # the pipeline config's keys this CLI reads besides sft


@dataclass(frozen=True)
class SFTRun:
    """What ``python -m teams_rl_jax.sft`` runs: one SFT config into one run dir."""

    run_dir: str = "runs/sft"
    distributed: Literal["auto", "on", "off"] = "auto"
    sft: SFTConfig = field(default_factory=SFTConfig)


def as_sft_run(data: dict) -> dict:
    """A pipeline config's ``run_dir``/``distributed``/``sft``, or a bare ``SFTConfig`` under ``sft``."""
    if "sft" in data:
        return {k: data[k] for k in (*TOP, "sft") if k in data}
    return {"sft": data}


def sft_override(item: str) -> str:
    key = item.split("=", 1)[0].strip()
    return item if key.startswith("sft.") or key in TOP else "sft." + item


def build_parser():
    return cli.config_parser("python -m teams_rl_jax.sft", __doc__)


@cli.entry_point
def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point; user errors print one line and return 2."""
    args = build_parser().parse_args(argv)
    args.set = [sft_override(s) for s in args.set]
    run = cli.load_config(SFTRun, args, reshape=as_sft_run)
    maybe_initialize_distributed(run.distributed)
    train(run.sft, run.run_dir)


if __name__ == "__main__":
    sys.exit(main())
