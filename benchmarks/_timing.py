"""Shared timing for the benchmark scripts: interleaved rounds, median and best ratios, load average.

Every script times our implementation and the reference *alternately* (one measurement of each per
round, after a warm-up) so both see the same machine conditions, and prints one table whose ratio
columns are the median ratio (the headline figure) and the best ratio, with the 1-minute load average
before and after the run (a shared 2-core VM is rarely quiet: the load says how far to trust it) and,
on Linux, the share of CPU time the hypervisor *stole* since the script started: a VM whose host is
busy loses cycles that its own load average never shows (measured up to 15% on the development VM).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable


def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def cpu_times() -> list[int] | None:
    """The aggregate ``cpu`` line of ``/proc/stat`` (user nice system idle iowait irq softirq steal ...), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    return [int(x) for x in fields[1:]] if fields and fields[0] == "cpu" else None


_START = cpu_times()  # taken when a script imports this module: steal() covers the whole run


def steal(since: list[int] | None = None) -> float:
    """Percent of CPU time stolen by the hypervisor since ``since`` (default: this module's import); NaN if unknown."""
    a, b = since or _START, cpu_times()
    if not a or not b or len(a) < 8 or len(b) < 8:
        return float("nan")
    total = sum(b[:8]) - sum(a[:8])
    return 100.0 * (b[7] - a[7]) / total if total > 0 else float("nan")


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (``fn`` must block until its result is ready)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleave(impls: dict[str, Callable[[], dict[str, float]]], rounds: int) -> dict[str, dict[str, list[float]]]:
    """Run each implementation once per round, in turn, ``rounds`` times (after one warm-up call each).

    Each callable returns ``{metric: value}`` for that round (e.g. tokens/s); the result is
    ``{impl: {metric: [value per round]}}``.
    """
    if rounds < 5:
        raise ValueError(f"rounds={rounds}: use at least 5 interleaved rounds")
    for fn in impls.values():
        fn()  # warm-up: compilation, allocator, caches
    out: dict[str, dict[str, list[float]]] = {name: {} for name in impls}
    for _ in range(rounds):
        for name, fn in impls.items():
            for metric, value in fn().items():
                out[name].setdefault(metric, []).append(value)
    return out


def table(results: dict[str, dict[str, list[float]]], ours: str, ref: str | None, load_before: float,
          load_after: float, higher_is_better: bool = True, unit: str = "tok/s") -> str:
    """One table: per metric, each implementation's median and best, the median ratio and the best ratio
    (ours / ref for rates), and the load average before/after."""
    metrics = list(results[ours])
    best = max if higher_is_better else min
    lines = [f"{'metric':<12}{'impl':<30}{'median ' + unit:>16}{'best ' + unit:>16}{'median ratio':>14}{'best ratio':>12}"]
    def clean(vals):  # a round can be NaN (e.g. decode time <= 0 on a noisy machine): skip it
        return [v for v in vals if v == v] or [float("nan")]

    results = {name: {m: clean(v) for m, v in res.items()} for name, res in results.items()}
    for m in metrics:
        for name in [ours] + ([ref] if ref else []):
            vals = results[name][m]
            lines.append(f"{m:<12}{name:<30}{statistics.median(vals):>16,.1f}{best(vals):>16,.1f}")
        if ref:
            a, b = results[ours][m], results[ref][m]
            med = statistics.median(a) / statistics.median(b)
            bst = best(a) / best(b)
            if not higher_is_better:
                med, bst = 1 / med, 1 / bst
            lines.append(f"{m:<12}{'ratio (ours/ref)':<30}{'':>16}{'':>16}{med:>13.2f}x{bst:>11.2f}x")
    lines.append(f"load average (1 min): before {load_before:.2f}, after {load_after:.2f}; cores={os.cpu_count()}; "
                 f"rounds={len(results[ours][metrics[0]])} interleaved; steal {steal():.1f}% of CPU time since start")
    return "\n".join(lines)
