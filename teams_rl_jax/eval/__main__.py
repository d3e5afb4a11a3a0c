"""``python -m teams_rl_jax.eval``: benchmarks, dataset reports and membership inference from the shell.

    python -m teams_rl_jax.eval --checkpoint DIR --tasks arc_easy,hellaswag --data-dir DIR
    python -m teams_rl_jax.eval --dataset A.jsonl [--compare B.jsonl ...]
    python -m teams_rl_jax.eval --mia --checkpoint DIR --members M.jsonl --non-members N.jsonl [--reference DIR]

Modes combine; everything lands in ``--out`` (default ``eval_report``) as report.md, report.json and
PNGs, the same code the pipeline's eval stage runs. A dataset's ``summary.json`` (the generate
stage's) is read from the same folder when present. User errors print ``error: ...``; exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from teams_rl_jax import cli
from teams_rl_jax.errors import ConfigError
from teams_rl_jax.eval.config import ALL_TASKS
from teams_rl_jax.eval.mia import run_mia
from teams_rl_jax.eval.multiple_choice import build_mesh, evaluate_checkpoint
from teams_rl_jax.eval.report import write_report
from teams_rl_jax.eval.stage import dataset_reports
from teams_rl_jax.layout import GenerateDir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m teams_rl_jax.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="local HF checkpoint dir (config.json, safetensors, tokenizer)")
    p.add_argument("--tasks", help="comma-separated benchmark tasks (arc_easy, arc_challenge, hellaswag, mmlu, "
                                   "truthfulqa_mc1, truthfulqa_mc2)")
    p.add_argument("--data-dir", help="local directory holding the benchmark files")
    p.add_argument("--limit", type=int, help="first N examples per task")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--dataset", help="generated dataset (Alpaca JSONL) to report on")
    p.add_argument("--compare", nargs="*", default=[], help="datasets to compare side by side")
    p.add_argument("--encoder", help="MiniLM dir for the embedding diversity (default: packaged; 'none': skip)")
    p.add_argument("--diversity-max", type=int, default=256)
    p.add_argument("--mia", action="store_true", help="run membership inference")
    p.add_argument("--members")
    p.add_argument("--non-members")
    p.add_argument("--reference", help="reference checkpoint for the calibrated attack")
    p.add_argument("--max-examples", type=int, default=256)
    p.add_argument("--template", choices=("alpaca", "vicuna", "chat"), default="alpaca")
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--out", default="eval_report", help="output dir")
    return p


def _name(path: Path, used: set) -> str:
    name = path.stem if path.stem not in ("generated", "data") else path.parent.name
    while name in used:
        name += "'"
    used.add(name)
    return name


def run(args: argparse.Namespace, log=print) -> dict:
    rep: dict = {"notes": []}
    did = False
    if args.dataset:
        used: set = set()
        files = [Path(f) for f in [args.dataset] + args.compare]
        sets = [(_name(f, used), f, GenerateDir(f.parent).summary) for f in files]  # the generate stage's summary
        rep["datasets"] = dataset_reports(sets, encoder=args.encoder, diversity_max=args.diversity_max, seed=0, log=log)
        did = True
    elif args.compare:
        raise ConfigError("--compare needs --dataset")
    if args.mia:
        if not (args.checkpoint and args.members and args.non_members):
            raise ConfigError("--mia needs --checkpoint, --members and --non-members")
        rep["mia"] = run_mia(args.checkpoint, args.members, args.non_members, reference=args.reference,
                             template=args.template, max_seq_len=args.max_seq_len, max_examples=args.max_examples,
                             log=log)
        did = True
    if args.tasks or args.data_dir:
        if not (args.checkpoint and args.tasks and args.data_dir):
            raise ConfigError("benchmarks need --checkpoint, --tasks and --data-dir")
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        for t in tasks:
            if t not in ALL_TASKS:
                raise ConfigError(f"--tasks: unknown task {t!r} (valid: {', '.join(ALL_TASKS)})")
        res = evaluate_checkpoint(args.checkpoint, args.data_dir, tasks, limit=args.limit, batch_size=args.batch_size,
                                  max_length=args.max_length, dtype=args.dtype, mesh=build_mesh(), log=log)
        rep["benchmarks"] = {t: {k: v for k, v in r.items() if k != "docs"} for t, r in res.items()}
        did = True
    if not did:
        raise ConfigError("nothing to do: give --dataset, --mia or --checkpoint/--tasks/--data-dir")
    write_report(args.out, rep)
    log(f"[eval] wrote {Path(args.out) / 'report.md'}")
    return rep


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    """CLI entry point; user errors print one line and return 2."""
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
