"""``python -m teams_rl_jax.train``: run the TeaMs-RL pipeline (policy -> generate -> sft -> eval) into one run dir.

    python -m teams_rl_jax.train                                   # offline default (package data)
    python -m teams_rl_jax.train --config configs/openai_endpoint.yaml --run-dir runs/vllm
    python -m teams_rl_jax.train --config my.yaml --stages policy --set policy.algo=ppo
    python -m teams_rl_jax.train --force --stages generate         # redo a finished stage
    python -m teams_rl_jax.train --config my.yaml --worker 2/8     # generate worker 2 of 8 (HTTP roles;
                                                                   # the last to finish merges)

Stages run in pipeline order; each reads only earlier stages' artifacts in the run dir. A finished
stage is skipped, so a killed pipeline rerun with the same command continues to the end; a stage
whose inputs changed (an earlier stage was redone) is redone; one whose own config changed asks for
``--force`` (see ``teams_rl_jax.stages``). The resolved config (secrets redacted) is written to
``run_dir/config.yaml``. User errors print ``error: <one line>`` and exit with status 2.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import jax

from teams_rl_jax import cli, stages
from teams_rl_jax import config as cfglib
from teams_rl_jax.data.seeds import check_seed_file
from teams_rl_jax.distributed import maybe_initialize_distributed
from teams_rl_jax.errors import ConfigError
from teams_rl_jax.layout import STAGES, RunLayout
from teams_rl_jax.train_config import TrainConfig  # noqa: F401 (re-exported: the CLI's config)

DEFAULT_CONFIG = "default.yaml"  # package data: teams_rl_jax/configs/default.yaml


def run(cfg: TrainConfig, log: Callable[[str], None] = print, *, force: bool = False) -> Path:
    """Run ``cfg.stages`` in pipeline order into ``cfg.run_dir``; returns the run directory."""
    cfg.validate()
    if {"policy", "generate"} & set(cfg.stages):
        check_seed_file(cfg.seeds)  # before any stage runs: a missing Alpaca file is a one-line error
    worker = cfg.generate.worker is not None
    if worker:
        if tuple(cfg.stages) != ("generate",):
            raise ConfigError(f"generate.worker: worker mode runs the generate stage only (--stages generate), "
                              f"got stages {list(cfg.stages)}")
        if force:
            raise ConfigError("--force: not with --worker (each worker would delete the others' shards); redo "
                              "the stage once without --worker, or use a new --run-dir")
    else:
        maybe_initialize_distributed(cfg.distributed)
    layout = RunLayout(cfg.run_dir)
    lead = jax.process_index() == 0
    if lead:
        layout.root.mkdir(parents=True, exist_ok=True)
        cfglib.dump(cfg, layout.config)
    say = log if lead else (lambda msg: None)  # only process 0 logs
    for name in STAGES:
        if name in cfg.stages:
            stages.run_stage(cfg, layout, name, say, force=force, lead=lead, worker=worker,
                             rerun=cfg.generate.worker == "merge")
    say(final_message(cfg, layout))
    return layout.root


def final_message(cfg: TrainConfig, layout: RunLayout) -> str:
    """Where each artifact is, and how to scale the run up."""
    rows = [
        ("policy checkpoint", layout.policy.checkpoint, "curves: policy/curves.png, summary.json"),
        ("dataset", layout.data.records, "summary: data/summary.json; baselines: data/baselines/"),
        ("SFT checkpoint", layout.sft.ckpt, "Hugging Face export: sft/hf"),
        ("eval report", layout.eval.report_md, "also eval/report.json"),
        ("dataset browser", layout.eval.browse, "open in a browser: every step of data/trace.jsonl"),
    ]
    lines = [f"done: {layout.root}"]
    for what, path, extra in rows:
        if path.exists():
            lines.append(f"  {what:<18} {path}  ({extra})")
    if cfg.offline_demo:
        lines += [
            "This was a small-scale offline run: the policy learned on the LLM-free token-edit env, the expert is",
            "a tiny random Llama (its answers are random words), and the fine-tuned model is tiny and random.",
            "To use real models, point each role at a local Hugging Face checkpoint or an OpenAI-compatible",
            "endpoint, e.g.:",
            "  --set roles.expert.backend=flax --set roles.expert.checkpoint=/models/vicuna-7b",
            "  --set roles.instructor.backend=openai --set roles.instructor.base_url=http://127.0.0.1:8000/v1 \\",
            "      --set roles.instructor.model=NAME --set generate.operator_role=instructor",
            "  --set sft.model.path=/models/llama-7b   (and see configs/llama2_7b_gpu.yaml, configs/openai_endpoint.yaml)",
        ]
    return "\n".join(lines)


def build_parser():
    """The CLI's argument parser."""
    ap = cli.config_parser("python -m teams_rl_jax.train", __doc__, force=True,
                           config_help="YAML config (default: the packaged offline default)")
    ap.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--worker", default=None, metavar="I/N|slurm|merge",
                    help="generate worker mode without jax.distributed (= --set generate.worker=...; implies "
                         "--stages generate): worker I of N, the SLURM array's index, or merge the finished shards")
    return ap


def default_config_path() -> Path:
    """The packaged default config (works from a wheel install, from any directory)."""
    return Path(str(resources.files("teams_rl_jax.configs").joinpath(DEFAULT_CONFIG)))


def load_config(args) -> TrainConfig:
    """TrainConfig from the parsed CLI arguments."""
    stage_list = [s.strip() for s in (args.stages or "").split(",") if s.strip()]
    if getattr(args, "worker", None) and not args.stages:
        stage_list = ["generate"]
    extra = ["stages=[" + ",".join(stage_list) + "]"] if stage_list else []
    if getattr(args, "worker", None):
        extra.append(f"generate.worker={args.worker}")
    return cli.load_config(TrainConfig, args, default=default_config_path(), overrides=extra)


@cli.entry_point
def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point; returns the exit status (2 for user errors)."""
    args = build_parser().parse_args(argv)
    run(load_config(args), force=args.force)


if __name__ == "__main__":
    sys.exit(main())
