"""``python -m teams_rl_jax.train``: run the TeaMs-RL pipeline (policy -> generate -> sft -> eval) into one run dir.

    python -m teams_rl_jax.train                                   # offline default (package data)
    python -m teams_rl_jax.train --config configs/openai_endpoint.yaml --run-dir runs/vllm
    python -m teams_rl_jax.train --config my.yaml --stages policy --set policy.algo=ppo
    python -m teams_rl_jax.train --force --stages generate         # redo a finished stage

Stages run in pipeline order; each reads only earlier stages' artifacts in the run dir. A stage whose
outputs are complete (``run_dir/.stages/<stage>.json`` written after them) is skipped unless
``--force``, so a killed pipeline rerun with the same command continues to the end. The resolved
config (secrets redacted) is written to ``run_dir/config.yaml``. User errors print
``error: <one line>`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Literal

from teams_rl_jax import config as cfglib
from teams_rl_jax import host_malloc
from teams_rl_jax.backends.config import RoleConfig, RolesConfig
from teams_rl_jax.errors import ConfigError, TeamsError
from teams_rl_jax.eval.config import EvalConfig
from teams_rl_jax.evolve.config import GenerateConfig
from teams_rl_jax.rl.config import PolicyConfig
from teams_rl_jax.sft.config import SFTConfig

STAGES = ("policy", "generate", "sft", "eval")
DEFAULT_CONFIG = "default.yaml"  # package data: teams_rl_jax/configs/default.yaml
TINY_EXPERT = "models/tiny-expert"  # offline default: a tiny random Llama saved into the run dir


@dataclass(frozen=True)
class TrainConfig:
    """The whole pipeline: run directory, which stages, the LLM roles, and each stage's own config."""

    run_dir: str = "runs/default"
    stages: tuple[str, ...] = STAGES
    # "auto": call jax.distributed.initialize() under SLURM / a TPU pod / explicit coordinator env vars.
    distributed: Literal["auto", "on", "off"] = "auto"
    # Small-scale offline run: a roles.expert left unset becomes a tiny random Llama (+ word tokenizer)
    # saved under run_dir/models/tiny-expert and served through the flax backend like a 7B model.
    offline_demo: bool = False
    roles: RolesConfig = field(default_factory=RolesConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

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


# ------------------------------------------------------------------------------------------- stages
def _stage_policy(cfg: TrainConfig, run_dir: Path, log: Callable[[str], None]) -> None:
    import inspect

    from teams_rl_jax.rl.stage import run_policy_stage

    if "roles" in inspect.signature(run_policy_stage).parameters:  # the LLM env's instructor/reviewer
        run_policy_stage(cfg.policy, run_dir, roles=cfg.roles, log=log)
    else:
        run_policy_stage(cfg.policy, run_dir, log=log)


def _stage_generate(cfg: TrainConfig, run_dir: Path, log: Callable[[str], None]) -> None:
    from teams_rl_jax.evolve import run_generate_stage

    gen = cfg.generate
    if gen.selector == "policy" and gen.policy_dir is None and not (run_dir / "policy" / "policy.json").is_file():
        raise ConfigError(f"generate: selector 'policy' needs the policy stage's output {run_dir / 'policy'} "
                          f"(run the policy stage first, or set generate.selector: random)")
    run_generate_stage(gen, run_dir, cfg.roles, log=log)


def _stage_sft(cfg: TrainConfig, run_dir: Path, log: Callable[[str], None]) -> None:
    from teams_rl_jax.sft.loop import run_sft_stage

    run_sft_stage(cfg.sft, run_dir, log=log)


def _stage_eval(cfg: TrainConfig, run_dir: Path, log: Callable[[str], None]) -> None:
    from teams_rl_jax.eval.stage import run_eval_stage

    run_eval_stage(cfg.eval, run_dir, log=log)


RUNNERS = {"policy": _stage_policy, "generate": _stage_generate, "sft": _stage_sft, "eval": _stage_eval}
# What each stage leaves (relative to the run dir); all present + the stage marker = complete.
OUTPUTS = {
    "policy": ("policy/policy.json", "policy/summary.json"),
    "generate": ("data/generated.jsonl", "data/summary.json"),
    "sft": ("sft/hf/config.json",),
    "eval": ("eval/report.json",),
}
# What --force removes before rerunning a stage (the response cache is kept: no query is paid twice).
FORCE_REMOVE = {"policy": ("policy",), "generate": ("data",), "sft": ("sft",), "eval": ("eval",)}


def _section(cfg: TrainConfig, stage: str) -> dict:
    """The config a stage's outputs depend on (its own section; generate also its roles)."""
    d = cfglib.to_dict(cfg)
    sec = {"policy": d["policy"], "generate": {"generate": d["generate"], "roles": d["roles"]},
           "sft": d["sft"], "eval": d["eval"]}[stage]
    return sec


def _fingerprint(cfg: TrainConfig, stage: str) -> str:
    return hashlib.sha256(json.dumps(_section(cfg, stage), sort_keys=True).encode()).hexdigest()[:16]


def stage_complete(cfg: TrainConfig, run_dir: Path, stage: str) -> bool:
    """Whether ``stage``'s outputs are complete; a finished stage run with another config is an error."""
    marker = run_dir / ".stages" / f"{stage}.json"
    if not marker.is_file() or not all((run_dir / p).exists() for p in OUTPUTS[stage]):
        return False
    done = json.loads(marker.read_text())
    if done.get("config") != _fingerprint(cfg, stage):
        raise ConfigError(f"stage '{stage}' in {run_dir} already finished with a different '{stage}' config; "
                          f"rerun it with --force (or use a new --run-dir)")
    return True


def _mark_complete(cfg: TrainConfig, run_dir: Path, stage: str) -> None:
    marker = run_dir / ".stages" / f"{stage}.json"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"stage": stage, "config": _fingerprint(cfg, stage)}))


# ------------------------------------------------------------------------------------ offline demo
def tiny_expert(run_dir: Path, seeds_path: str | None = None) -> Path:
    """A tiny random Llama + word tokenizer in ``run_dir/models/tiny-expert`` (made once, seeded).

    It goes through the same ``FlaxBackend`` path as a 7B checkpoint; it answers with random words.
    """
    path = run_dir / TINY_EXPERT
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    import jax

    from teams_rl_jax.env.seeds import offline_tokenizer
    from teams_rl_jax.evolve.records import read_seeds
    from teams_rl_jax.models import init, save_pretrained

    # Word-level: every word of the seeds and of the env's phrase banks (what evolved prompts contain).
    tok = offline_tokenizer([s.text for s in read_seeds(seeds_path)], vocab_size=4096)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(str(tmp))
    vocab = (len(tok) + 63) // 64 * 64
    lm = init(dict(model_type="llama", vocab_size=vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                   initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=0),
              jax.random.key(0))
    save_pretrained(lm, tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def with_demo_roles(cfg: TrainConfig, run_dir: Path) -> TrainConfig:
    """``cfg`` with the offline demo's expert filled in where ``roles.expert`` is unset."""
    if not cfg.offline_demo or cfg.roles.expert is not None or not ({"generate"} & set(cfg.stages)):
        return cfg
    ckpt = tiny_expert(run_dir, cfg.generate.seeds)
    roles = dataclasses.replace(cfg.roles, expert=RoleConfig(backend="flax", checkpoint=str(ckpt), dtype="float32",
                                                             max_batch=64, model="tiny-random-llama"))
    return dataclasses.replace(cfg, roles=roles)


# ------------------------------------------------------------------------------------------- driver
def run(cfg: TrainConfig, log: Callable[[str], None] = print, *, force: bool = False) -> Path:
    """Run ``cfg.stages`` in pipeline order into ``cfg.run_dir``; returns the run directory."""
    import jax

    cfg.validate()
    maybe_initialize_distributed(cfg.distributed)
    run_dir = Path(cfg.run_dir)
    lead = jax.process_index() == 0
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfglib.dump(cfg, run_dir / "config.yaml")
    quiet = log if lead else (lambda msg: None)  # only process 0 logs
    for name in STAGES:
        if name not in cfg.stages:
            continue
        if not force and stage_complete(cfg, run_dir, name):
            quiet(f"[{name}] complete in {run_dir} (skipped; --force reruns it)")
            continue
        if force and lead:
            for sub in FORCE_REMOVE[name]:
                shutil.rmtree(run_dir / sub, ignore_errors=True)
            (run_dir / ".stages" / f"{name}.json").unlink(missing_ok=True)
        stage_cfg = with_demo_roles(cfg, run_dir) if name == "generate" else cfg
        RUNNERS[name](stage_cfg, run_dir, quiet)
        if lead:
            _mark_complete(cfg, run_dir, name)
    quiet(final_message(cfg, run_dir))
    return run_dir


def final_message(cfg: TrainConfig, run_dir: Path) -> str:
    """Where each artifact is, and how to scale the run up."""
    rows = [
        ("policy checkpoint", run_dir / "policy" / "checkpoint", "curves: policy/curves.png, summary.json"),
        ("dataset", run_dir / "data" / "generated.jsonl", "summary: data/summary.json; baselines: data/baselines/"),
        ("SFT checkpoint", run_dir / "sft" / "ckpt", "Hugging Face export: sft/hf"),
        ("eval report", run_dir / "eval" / "report.md", "also eval/report.json"),
    ]
    lines = [f"done: {run_dir}"]
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


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    ap = argparse.ArgumentParser(prog="python -m teams_rl_jax.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML config (default: the packaged offline default)")
    ap.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--run-dir", default=None, help="run directory (overrides run_dir)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--force", action="store_true", help="rerun stages even when their outputs are complete")
    return ap


def default_config_path() -> Path:
    """The packaged default config (works from a wheel install, from any directory)."""
    return Path(str(resources.files("teams_rl_jax.configs").joinpath(DEFAULT_CONFIG)))


def load_config(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from the parsed CLI arguments."""
    path = args.config if args.config is not None else default_config_path()
    overrides = list(args.set)
    if args.stages:
        overrides.append("stages=[" + ",".join(s.strip() for s in args.stages.split(",") if s.strip()) + "]")
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    return cfglib.load(TrainConfig, path, overrides)


def quiet_libraries() -> None:
    """Silence library chatter a user cannot act on (set before those libraries are imported)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # e.g. "PyTorch was not found ..."
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import logging
    import warnings

    for name in ("absl", "orbax", "jax._src.xla_bridge", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="orbax")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for user errors)."""
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        host_malloc.configure()  # before JAX starts its CPU threads (see host_malloc)
        cfg = load_config(args)
        run(cfg, force=args.force)
    except TeamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
