"""CLI: ``python -m teams_rl_jax.serve --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--api-key-env NAME]
[--files-dir DIR]``.

Bad input (missing checkpoint, unset key variable, bad mesh) prints ``error: ...`` and exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time

import uvicorn

from teams_rl_jax import cli
from teams_rl_jax.backends.config import DTYPES, RoleConfig
from teams_rl_jax.backends.continuous import SAMPLING_MODES
from teams_rl_jax.backends.flax_backend import FlaxBackend
from teams_rl_jax.errors import ConfigError
from teams_rl_jax.serve.app import Limits, make_app
from teams_rl_jax.serve.batch import BatchLimits


def parse_mesh(text: str | None) -> dict | None:
    """``"data=1,fsdp=2,tensor=4"`` -> ``{"data": 1, "fsdp": 2, "tensor": 4}``."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        key, _, val = part.partition("=")
        if key.strip() not in ("data", "fsdp", "tensor") or not val.strip().lstrip("-").isdigit():
            raise ConfigError(f"--mesh: expected data=N,fsdp=N,tensor=N, got {text!r}")
        out[key.strip()] = int(val)
    return out


SERVE_DTYPES = DTYPES  # what load_pretrained accepts


def resolve_dtype(dtype: str, checkpoint: str) -> str:
    """``--dtype``: as given, or for ``auto`` the checkpoint's own (vLLM's ``auto``): config.json's ``dtype``
    (transformers 5) or ``torch_dtype`` (4.x), ``float32`` when neither is there."""
    if dtype != "auto":
        return dtype
    path = os.path.join(checkpoint, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--dtype auto: cannot read {path}: {e}") from e
    found = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    found = str(found).removeprefix("torch.")
    if found not in SERVE_DTYPES:
        raise ConfigError(f"--dtype auto: {path} names dtype {found!r}; pass --dtype one of {list(SERVE_DTYPES)}")
    return found


def _sampling_modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in modes if m not in SAMPLING_MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"{text!r}: give some of {', '.join(SAMPLING_MODES)}")
    return modes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m teams_rl_jax.serve", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="local Hugging Face checkpoint dir (tokenizer beside it)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-env", default=None, help="NAME of the env variable holding the bearer token")
    p.add_argument("--model-name", default=None, help="served model name (default: the checkpoint dir name)")
    p.add_argument("--dtype", default="auto", choices=["auto", *SERVE_DTYPES],
                   help="parameter dtype; auto (default) = the checkpoint's own (config.json dtype / torch_dtype), "
                        "float32 if it names none")
    p.add_argument("--mesh", default=None, help="e.g. data=1,fsdp=1,tensor=8 (default: one device)")
    p.add_argument("--max-batch", type=int, default=32,
                   help="KV-cache slots: rows decoded at once (continuous batching)")
    p.add_argument("--min-batch", type=int, default=1,
                   help="pad every prefill to at least this many rows (fewer programs to compile)")
    p.add_argument("--decode-chunk", type=int, default=8,
                   help="decode steps between admissions (a finished row idles fewer than this many)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--max-prompt-tokens", type=int, default=4096)
    p.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--max-n", type=int, default=8)
    p.add_argument("--warmup", action="store_true",
                   help="before serving, allocate the KV cache for --max-prompt-tokens + --max-tokens and compile "
                        "every prefill/decode program such requests can need: the memory peak is known at start "
                        "and no request waits for a compile (startup takes that many compiles longer)")
    p.add_argument("--warmup-sampling", type=_sampling_modes, default=SAMPLING_MODES,
                   help="the decode sampling branches --warmup compiles, comma-separated (default all: "
                        f"{','.join(SAMPLING_MODES)}); a server that sees only temperature 0 needs only greedy")
    p.add_argument("--files-dir", default="serve_files",
                   help="Batch API files and batches, kept across restarts (default ./serve_files)")
    p.add_argument("--max-upload-bytes", type=int, default=100 << 20, help="largest /v1/files upload")
    p.add_argument("--max-batch-lines", type=int, default=50_000, help="most requests in one batch")
    p.add_argument("--batch-fail-once", default=None, help=argparse.SUPPRESS)  # test hook (serve.batch)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


@cli.entry_point
def main(argv=None) -> None:
    """CLI entry point: serve until stopped; bad input prints one ``error:`` line and returns 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app, backend, key = build_app(args)
    if args.warmup:
        t0 = time.monotonic()
        positions = backend.lm.config.max_position_embeddings  # no request goes past them (serve.parse)
        w = backend.engine.warm(min(args.max_prompt_tokens, positions), min(args.max_tokens, positions),
                                args.warmup_sampling)
        logging.getLogger(__name__).info(
            "warm-up: %d prefill + %d decode programs, KV cache %d columns (%.1f MiB) in %.1f s", w["insert"],
            w["decode"], w["cache_len"], w["cache_bytes"] / 2**20, time.monotonic() - t0)
    logging.getLogger(__name__).info("serving %s (%s) on http://%s:%d/v1 (auth %s)", backend.model,
                                     backend.lm.dtype, args.host, args.port, "on" if key else "off")
    # uvicorn drains the in-flight requests on SIGTERM/SIGINT, then re-raises the signal to the handler
    # installed before it: a no-op here, so a drained shutdown exits 0 (a supervisor reads it as clean).
    # Installed only now: while the model loads, SIGTERM still kills at once.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    logging.getLogger(__name__).info("drained and stopped")


def build_app(args: argparse.Namespace):
    """``(app, backend, api key)`` from the parsed arguments; bad input raises ``ConfigError``."""
    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise ConfigError(f"--api-key-env: environment variable {args.api_key_env} is not set")
    if not os.path.isdir(args.checkpoint):
        raise ConfigError(f"--checkpoint: no such directory: {args.checkpoint}")
    dtype = resolve_dtype(args.dtype, args.checkpoint)
    cfg = RoleConfig(backend="flax", checkpoint=args.checkpoint, dtype=dtype, mesh=parse_mesh(args.mesh),
                     max_batch=args.max_batch, model=args.model_name)
    cfg.validate()
    backend = FlaxBackend.from_config(cfg, role="serve", min_batch=args.min_batch, decode_chunk=args.decode_chunk)
    limits = Limits(max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                    max_tokens=args.max_tokens, max_n=args.max_n)
    batch_limits = BatchLimits(max_upload_bytes=args.max_upload_bytes, max_lines=args.max_batch_lines,
                               fail_once=args.batch_fail_once)
    app = make_app(backend, model_name=args.model_name, api_key=key, limits=limits, files_dir=args.files_dir,
                   batch_limits=batch_limits)
    return app, backend, key


if __name__ == "__main__":
    sys.exit(main())
