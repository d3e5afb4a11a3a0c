"""``python -m teams_rl_jax.train``: run the TeaMs-RL pipeline stages into one run directory.

    python -m teams_rl_jax.train                                   # offline default (configs/default.yaml)
    python -m teams_rl_jax.train --config my.yaml --stages policy --set policy.algo=ppo

Stages run in pipeline order (policy, generate, sft, eval); each reads only earlier stages'
artifacts in ``run_dir``, so any stage can be rerun alone. The resolved config (secrets redacted) is
written to ``run_dir/config.yaml``. User errors print ``error: <one line>`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from teams_rl_jax import config as cfglib
from teams_rl_jax.errors import ConfigError, TeamsError
from teams_rl_jax.rl.config import PolicyConfig
from teams_rl_jax.sft.config import SFTConfig

STAGES = ("policy", "generate", "sft", "eval")
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


@dataclass(frozen=True)
class TrainConfig:
    """The whole pipeline: run directory, which stages, and each stage's own config."""

    run_dir: str = "runs/default"
    stages: tuple[str, ...] = STAGES
    # "auto": call jax.distributed.initialize() under SLURM / a TPU pod / explicit coordinator env vars.
    distributed: Literal["auto", "on", "off"] = "auto"
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

    def validate(self) -> None:
        """Check stage names."""
        for s in self.stages:
            if s not in STAGES:
                raise ConfigError(f"stages: unknown stage {s!r} (valid: {', '.join(STAGES)})")


def maybe_initialize_distributed(mode: str) -> bool:
    """Initialize ``jax.distributed`` for multi-process runs; returns whether it was initialized.

    ``auto`` initializes when the environment names a multi-process launch: SLURM with several tasks,
    a multi-host TPU slice, or ``JAX_COORDINATOR_ADDRESS`` (+ ``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``).
    """
    import os

    import jax

    if mode == "off":
        return False
    env = os.environ
    multi = (
        int(env.get("SLURM_NTASKS", "1") or 1) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
        or "JAX_COORDINATOR_ADDRESS" in env
    )
    if mode == "auto" and not multi:
        return False
    if env.get("JAX_PLATFORMS", "") == "cpu":  # CPU multi-process (tests, debugging) needs gloo collectives
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if "JAX_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                                   int(env["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()  # reads SLURM / TPU metadata
    return True


def _stage_policy(cfg: TrainConfig, run_dir: Path, log: Callable[[str], None]) -> None:
    from teams_rl_jax.rl.stage import run_policy_stage

    run_policy_stage(cfg.policy, run_dir, log=log)


def _stage_sft(cfg: TrainConfig, run_dir: Path, log: Callable[[str], None]) -> None:
    from teams_rl_jax.sft.loop import run_sft_stage

    run_sft_stage(cfg.sft, run_dir, log=log)


def _not_yet(name: str, issue: str):
    def run(cfg: TrainConfig, run_dir: Path, log: Callable[[str], None]) -> None:
        log(f"[{name}] stage not implemented yet ({issue}); skipping")

    return run


RUNNERS = {
    "policy": _stage_policy,
    "generate": _not_yet("generate", "arrives with the generate/backends issue"),
    "sft": _stage_sft,
    "eval": _not_yet("eval", "arrives with the eval issue"),
}


def run(cfg: TrainConfig, log: Callable[[str], None] = print) -> Path:
    """Run ``cfg.stages`` in pipeline order into ``cfg.run_dir``; returns the run directory."""
    import jax

    cfg.validate()
    maybe_initialize_distributed(cfg.distributed)
    run_dir = Path(cfg.run_dir)
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfglib.dump(cfg, run_dir / "config.yaml")
    quiet = (lambda msg: None) if jax.process_index() != 0 else log  # only process 0 logs
    for name in STAGES:
        if name in cfg.stages:
            RUNNERS[name](cfg, run_dir, quiet)
    quiet(f"done: {run_dir}")
    return run_dir


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    ap = argparse.ArgumentParser(prog="python -m teams_rl_jax.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG.name} if present)")
    ap.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--run-dir", default=None, help="run directory (overrides run_dir)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    return ap


def load_config(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from the parsed CLI arguments."""
    path = args.config
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    overrides = list(args.set)
    if args.stages:
        overrides.append("stages=[" + ",".join(s.strip() for s in args.stages.split(",") if s.strip()) + "]")
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    return cfglib.load(TrainConfig, path, overrides)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for user errors)."""
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args)
        run(cfg)
    except TeamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
