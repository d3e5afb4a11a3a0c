"""The one command-line wrapper (after Levanter's ``config.main()``) for ``train``, ``sft``, ``eval``, ``serve``.

:func:`entry_point` owns what every CLI does the same way: quiet the libraries a user cannot act
on, configure the host allocator before JAX starts its threads (``host_malloc``), and turn a
:class:`~teams_rl_jax.errors.TeamsError` into one ``error: <message>`` line on stderr and exit status 2.
:func:`config_parser` and :func:`load_config` are the shared ``--config/--set/--run-dir[/--force]``
of the CLIs whose input is a config dataclass; the ``run_dir`` those CLIs write to is the config's
(``--run-dir`` overrides it).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from teams_rl_jax import config as cfglib
from teams_rl_jax import host_malloc
from teams_rl_jax.errors import TeamsError

T = TypeVar("T")
Main = Callable[[Sequence[str] | None], int | None]


def quiet_libraries() -> None:
    """Silence library chatter a user cannot act on (set before those libraries are imported)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # e.g. "PyTorch was not found ..."
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("absl", "orbax", "jax._src.xla_bridge", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="orbax")


def entry_point(main: Main) -> Callable[[Sequence[str] | None], int]:
    """Wrap ``main(argv)`` as a CLI entry point that returns its exit status (2 for user errors)."""

    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> int:
        quiet_libraries()
        try:
            host_malloc.configure()  # before JAX starts its CPU threads (see host_malloc)
            return main(argv) or 0
        except TeamsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return wrapped


def config_parser(prog: str, doc: str, *, force: bool = False, config_help: str = "YAML config") \
        -> argparse.ArgumentParser:
    """A parser with the config CLIs' ``--config``, ``--set``, ``--run-dir`` (and ``--force``)."""
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help=config_help)
    ap.add_argument("--run-dir", default=None, help="run directory (overrides the config's run_dir)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    if force:
        ap.add_argument("--force", action="store_true", help="redo stages even when their outputs are complete")
    return ap


def load_config(schema: type[T], args: argparse.Namespace, *, default: Path | None = None,
                overrides: Sequence[str] = (), reshape: Callable[[dict], dict] | None = None) -> T:
    """``schema`` from ``--config`` (else ``default``), then ``--set``, ``overrides`` (the CLI's own flags) and
    ``--run-dir`` last."""
    path = args.config if args.config is not None else default
    items = list(args.set) + list(overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    return cfglib.load(schema, path, items, reshape=reshape)
