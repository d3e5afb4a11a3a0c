"""Shared test fixtures. Sharding tests run their own subprocess with 8 simulated devices.

Seeds: tests draw randomness through ``helpers.rng(seed)`` / ``helpers.seed(value)``; the seeds a test
used are printed in its failure report (section "seeds"), so any failure can be replayed.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
