"""``host_malloc``: on CPU, XLA's per-call temp buffer stops page-faulting once freed memory is retained.

The measurement runs in a fresh subprocess per mode (the policy must precede the JAX backend): from a
worker thread, a jitted function whose temp buffer is 96 MiB (above glibc's 64 MiB per-thread heap)
is called twenty times, and the median minor page faults of the calls after the first four are
compared (``getrusage``). With the system allocator every call maps its temp afresh (at least its
~24,000 pages of 4 KiB); retained, most later calls reuse the heap and fault ~0 times.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading

import pytest

from teams_rl_jax import host_malloc
from teams_rl_jax.errors import ConfigError

TEMP_MB = 48  # two such arrays of temp, 96 MiB: above glibc's 64 MiB per-thread heap, so without the one
# shared arena a worker thread's temp is mmap'd afresh on every call
CALLS, WARM = 20, 4  # the retained heap settles over the first calls (fragmentation): most later calls fault ~0


def _faults_per_call(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(JAX_PLATFORMS="cpu", TEAMS_RL_JAX_MALLOC=mode)
    out = subprocess.run([sys.executable, __file__, "measure"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure() -> dict:
    """In this process: apply the policy, then count page faults of a call with a large XLA temp."""
    import resource

    applied = host_malloc.configure()
    import jax
    import jax.numpy as jnp

    rows, k, cols = TEMP_MB * 2**20 // 4 // 1536, 64, 1536

    @jax.jit
    def f(x, w):  # the [rows, cols] product is XLA temp, not an output
        a = x @ w
        return jnp.sum(jnp.tanh(a) * a[::-1])

    x, w = jnp.ones((rows, k), jnp.float32) / k, jnp.ones((k, cols), jnp.float32)
    temp = f.lower(x, w).compile().memory_analysis().temp_size_in_bytes
    faults = []

    def calls():  # off the main thread, like a training step: glibc gives such threads their own arenas
        for _ in range(CALLS):
            r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            f(x, w).block_until_ready()
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)

    worker = threading.Thread(target=calls)
    worker.start()
    worker.join()
    return {"applied": applied, "temp_bytes": temp, "faults": faults}


def test_retained_heap_removes_the_per_call_page_faults():
    system = _faults_per_call("system")
    retain = _faults_per_call("retain")
    assert system["applied"] == "system" and retain["applied"] == "retain", (system, retain)
    pages = system["temp_bytes"] / 4096
    assert pages > 5_000, system  # the temp is large enough to tell the two apart
    # The system allocator faults at least the temp in again on every call (XLA's GEMM scratch adds
    # more); retained, the heap is reused: almost none after the first call.
    # The calls after the warm-up: while the retained heap settles, a call can still map a block afresh.
    sys_steady, ret_steady = system["faults"][WARM:], retain["faults"][WARM:]
    assert statistics.median(sys_steady) >= pages, (system, pages)
    assert statistics.median(ret_steady) < 0.02 * pages, (retain, pages)


def test_auto_decides_by_platform_and_respects_user_malloc_tuning(monkeypatch):
    assert host_malloc.decide("auto", environ={}, cpu=True) == "retain"
    assert host_malloc.decide("auto", environ={}, cpu=False) == "system"
    assert host_malloc.decide("auto", environ={"MALLOC_ARENA_MAX": "4"}, cpu=True) == "system"
    assert host_malloc.decide(None, environ={host_malloc.ENV: "retain"}, cpu=False) == "retain"
    assert host_malloc.decide(None, environ={host_malloc.ENV: "system"}, cpu=True) == "system"
    with pytest.raises(ConfigError, match="TEAMS_RL_JAX_MALLOC='sometimes'"):
        host_malloc.decide(None, environ={host_malloc.ENV: "sometimes"})
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_malloc.cpu_only()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not host_malloc.cpu_only()


@pytest.mark.parametrize("entry", ["teams_rl_jax.train", "teams_rl_jax.sft", "teams_rl_jax.eval"])
def test_entry_points_apply_the_policy_before_jax_starts(entry, tmp_path):
    # A missing config / checkpoint fails the run after the policy is set; JAX never starts.
    args = {"teams_rl_jax.train": ["--config", str(tmp_path / "none.yaml")],
            "teams_rl_jax.sft": ["--config", str(tmp_path / "none.yaml")],
            "teams_rl_jax.eval": ["--checkpoint", str(tmp_path / "none"), "--tasks", "arc_easy"]}[entry]
    module = entry if entry == "teams_rl_jax.train" else entry + ".__main__"
    code = ("import importlib, sys; from teams_rl_jax import host_malloc; "
            f"rc = importlib.import_module({module!r}).main({args!r}); "
            "print(rc, host_malloc._applied, 'jax' in sys.modules and host_malloc._backend_started())")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(JAX_PLATFORMS="cpu", TEAMS_RL_JAX_MALLOC="auto")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    rc, applied, started = out.stdout.split()[-3:]
    assert (rc, applied, started) == ("2", "retain", "False"), out.stdout + out.stderr[-2000:]


if __name__ == "__main__" and sys.argv[1:] == ["measure"]:
    print(json.dumps(measure()))
