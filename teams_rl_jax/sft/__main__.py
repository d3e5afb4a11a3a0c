"""``python -m teams_rl_jax.sft --config configs/sft_tiny.yaml [--run-dir D] [--set key=value ...]``.

The YAML holds an ``SFTConfig`` (top-level keys model, data, optim, ...); a file written for
``python -m teams_rl_jax.train`` (with an ``sft:`` section) works too.
"""

from __future__ import annotations

import argparse
import sys

from teams_rl_jax import config as cfglib
from teams_rl_jax.errors import TeamsError


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; user errors print one line and return 2."""
    ap = argparse.ArgumentParser(prog="python -m teams_rl_jax.sft", description=__doc__)
    ap.add_argument("--config", default=None)
    ap.add_argument("--run-dir", default="runs/sft")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    try:
        from teams_rl_jax import host_malloc

        host_malloc.configure()  # before JAX starts its CPU threads
        from teams_rl_jax.sft.config import SFTConfig
        from teams_rl_jax.sft.loop import train
        from teams_rl_jax.train import maybe_initialize_distributed

        data = cfglib.read_yaml(args.config) if args.config else {}
        if "sft" in data:
            data = data["sft"]
        overrides = [s[len("sft."):] if s.startswith("sft.") else s for s in args.set]
        try:
            cfg = cfglib.from_dict(SFTConfig, cfglib.apply_overrides(data, overrides))
        except TeamsError as e:
            raise type(e)(f"{args.config}: {e}" if args.config else str(e)) from None
        maybe_initialize_distributed("auto")
        train(cfg, args.run_dir)
    except TeamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
