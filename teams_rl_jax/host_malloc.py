"""Keep freed host memory inside the process on CPU-only runs, so XLA:CPU's per-call buffers stop page-faulting.

Why: XLA:CPU allocates each executable's temp buffer (1.43 GiB for the CPU benchmark's SFT step) with
``malloc`` on one of its worker threads and frees it when the call ends. glibc serves an allocation
that large from a fresh ``mmap`` (a worker thread's arena cannot hold more than 64 MiB) and returns it
with ``munmap``, so every step faults the whole buffer back in, 4 KiB at a time: ~370,000 minor faults
and ~0.7 s of kernel time per 3 s step on the 2-core development VM (``docs/benchmarks.md``). Three
``mallopt`` settings keep the memory in the process instead:

* ``M_ARENA_MAX=1``: every thread allocates from the main arena, which grows with ``brk`` and has no
  64 MiB ceiling;
* ``M_MMAP_MAX=0``: large blocks come from that arena too, not from ``mmap``;
* ``M_TRIM_THRESHOLD=-1``: ``free`` never hands the top of the heap back to the kernel.

Measured on that step (``docs/benchmarks.md``): after a few warm-up steps the buffers are reused, 0
faults per step, and our step ran 26-40% faster in ``bench_sft.py``. The cost is memory: the heap
fragments while it settles, so RSS plateaus at up to ~3.5x the XLA temp above the live arrays (3.6-5.0
GiB against 2.3 GiB with the system allocator for that step, jax alone), and one arena lock serialises
``malloc`` across threads. That suits a CPU training or serving process, whose peak comes back every
step anyway (as with the tcmalloc or jemalloc preloads CPU frameworks recommend). It is wrong for an
accelerator host, where device memory holds the working set and several processes per host would each
keep their checkpoint-loading peak. So ``auto`` applies it only where JAX will run on the CPU, and
``TEAMS_RL_JAX_MALLOC=system`` gives the memory back where it is tight.
(``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, set before the process starts, cut the faults 300-fold with
transparent huge pages at unchanged RSS, but was not reliably faster: ``docs/benchmarks.md``.)

The settings bind a thread to an arena on its first ``malloc``; XLA creates its worker threads when
the backend starts. So ``configure`` must run before the first ``jax.devices()`` or array: the
command-line entry points call it first thing, and a library user can call it the same way.
``TEAMS_RL_JAX_MALLOC`` (``auto`` | ``retain`` | ``system``) overrides the choice, and any ``MALLOC_*``
environment variable (the user tuning glibc directly) turns ``auto`` off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
import sys

from teams_rl_jax.errors import ConfigError

log = logging.getLogger(__name__)

ENV = "TEAMS_RL_JAX_MALLOC"
MODES = ("auto", "retain", "system")
# glibc <malloc.h> parameter numbers.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8

_applied: str | None = None


def cpu_only() -> bool:
    """Whether JAX will run on the CPU: ``JAX_PLATFORMS`` names only ``cpu``, or no accelerator plugin
    (a ``jax_plugins`` entry point or namespace module, or ``libtpu``) is installed. Decided without
    starting a backend, since starting one is what ``configure`` must precede."""
    platforms = os.environ.get("JAX_PLATFORMS", "") or os.environ.get("JAX_PLATFORM_NAME", "")
    if platforms:
        return {p.strip().lower() for p in platforms.split(",") if p.strip()} == {"cpu"}
    if importlib.util.find_spec("libtpu") is not None:
        return False
    if list(importlib.metadata.entry_points(group="jax_plugins")):
        return False
    try:
        import jax_plugins  # the namespace package PJRT plugins (e.g. CUDA) install into
    except ImportError:
        return True
    return not any(pkgutil.iter_modules(getattr(jax_plugins, "__path__", [])))


def _backend_started() -> bool:
    """Whether a JAX backend already exists in this process (too late to move XLA's threads)."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(getattr(xla_bridge, "_backends", {}))
    except ImportError:  # a private module: if it moves, assume nothing started
        return False


def decide(mode: str | None = None, environ: dict | None = None, cpu: bool | None = None) -> str:
    """``retain`` or ``system`` for ``mode`` (default: the ``TEAMS_RL_JAX_MALLOC`` environment variable, else auto)."""
    env = os.environ if environ is None else environ
    mode = (mode or env.get(ENV) or "auto").strip().lower()
    if mode not in MODES:
        raise ConfigError(f"{ENV}={mode!r}: expected one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    if any(k.startswith("MALLOC_") for k in env):
        return "system"
    return "retain" if (cpu_only() if cpu is None else cpu) else "system"


def configure(mode: str | None = None) -> str:
    """Apply the host allocator policy once per process; returns what is in effect (``retain`` or ``system``).

    ``retain`` on a non-glibc libc, or after a JAX backend has started, logs why and leaves malloc alone.
    An unknown mode raises ``ConfigError`` (the entry points print it as one line and exit 2).
    """
    global _applied
    if _applied is not None:
        return _applied
    requested = (mode or os.environ.get(ENV) or "auto").strip().lower()
    want = decide(requested)
    _applied = "system"
    if want == "system":
        return _applied
    if _backend_started():  # e.g. a CLI main called in-process after JAX ran: only loud when asked for
        log.log(logging.WARNING if requested == "retain" else logging.DEBUG,
                "%s: a JAX backend already started; its threads keep their malloc arenas, so host buffers "
                "stay unretained (call host_malloc.configure() before the first jax.devices())", ENV)
        return _applied
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.info("%s: no glibc mallopt in %s; host malloc left as it is", ENV, name)
        return _applied
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)):
        if mallopt(param, value) != 1:
            log.info("%s: mallopt(%d, %d) refused; host malloc left partly as it is", ENV, param, value)
            return _applied
    _applied = "retain"
    return _applied
