"""``python -m teams_rl_jax.experiment``: policy vs random vs fixed vs WizardLM, each fine-tuned and attacked.

    python -m teams_rl_jax.experiment                          # offline default (package data), tiny models
    python -m teams_rl_jax.experiment --config configs/paper_llama2_7b_gpu.yaml --run-dir runs/exp7b
    python -m teams_rl_jax.experiment --set experiment.arms=[policy,random] --force

Rerunning the same command after a kill continues: finished arm stages are skipped, and every query
already paid is replayed from the experiment's response cache. Outputs: report.md, report.json,
roc.png in the run dir (see ``teams_rl_jax.experiment.runner``).
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import Sequence

from teams_rl_jax import cli

DEFAULT_CONFIG = "experiment.yaml"  # package data: teams_rl_jax/configs/experiment.yaml


def default_config_path() -> Path:
    return Path(str(resources.files("teams_rl_jax.configs").joinpath(DEFAULT_CONFIG)))


@cli.entry_point
def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point; returns the exit status (2 for user errors)."""
    args = cli.config_parser("python -m teams_rl_jax.experiment", __doc__, force=True,
                             config_help="YAML config (default: the packaged offline experiment)").parse_args(argv)
    from teams_rl_jax.experiment.config import ExperimentConfig  # after --help: JAX is slow to import
    from teams_rl_jax.experiment.runner import run

    run(cli.load_config(ExperimentConfig, args, default=default_config_path()), force=args.force)


if __name__ == "__main__":
    sys.exit(main())
