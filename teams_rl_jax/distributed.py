"""Multi-process start-up: ``jax.distributed.initialize`` when the environment names a multi-process launch.

One home for it (as Levanter's ``distributed.py``): the pipeline (``python -m teams_rl_jax.train``) and
the SFT CLI call :func:`maybe_initialize_distributed` before any JAX array exists.
"""

from __future__ import annotations

import os
from typing import Mapping


def is_multiprocess_launch(env: Mapping[str, str]) -> bool:
    """SLURM with several tasks, a multi-host TPU slice, or an explicit ``JAX_COORDINATOR_ADDRESS``."""
    return (int(env.get("SLURM_NTASKS", "1") or 1) > 1
            or "," in env.get("TPU_WORKER_HOSTNAMES", "")
            or "JAX_COORDINATOR_ADDRESS" in env)


def maybe_initialize_distributed(mode: str) -> bool:
    """Initialize ``jax.distributed`` for multi-process runs; returns whether it was initialized.

    ``mode``: ``off`` never, ``on`` always, ``auto`` when :func:`is_multiprocess_launch`. With
    ``JAX_COORDINATOR_ADDRESS`` set, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` give the rest; otherwise
    JAX reads SLURM / TPU metadata. CPU multi-process runs (tests, debugging) use gloo collectives.
    """
    import jax

    env = os.environ
    if mode == "off" or (mode == "auto" and not is_multiprocess_launch(env)):
        return False
    if env.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if "JAX_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                                   int(env["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()
    return True
