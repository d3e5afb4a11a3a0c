"""Shared test fixtures. Sharding tests run their own subprocess with 8 simulated devices.

Seeds: tests draw randomness through ``helpers.rng(seed)`` / ``helpers.seed(value)``; the seeds a test
used are printed in its failure report (section "seeds"), so any failure can be replayed.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One XLA compilation cache for the whole run: this process, its pytest-xdist workers and every subprocess
# the tests start (train/serve/launch runs) inherit the variable, so a program that the tiny models of many
# tests share compiles once per run. Fresh per run (removed at exit), so no run reads another's programs;
# a cache dir set by the caller is used as is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="teams-rl-jax-tests-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    # A size limit turns on JAX's file lock around every read and write (filelock, a transformers
    # dependency): two workers writing and reading one entry at once never see a partial file.
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import pytest  # noqa: E402

import helpers  # noqa: E402


@pytest.fixture(autouse=True)
def _clear_seed_record():
    helpers.SEEDS_USED.clear()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and helpers.SEEDS_USED:
        used = ", ".join(f"{label}={value}" for label, value in helpers.SEEDS_USED)
        report.sections.append(("seeds", f"seeds used by {item.nodeid}: {used}"))
