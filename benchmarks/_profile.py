"""Where a decode step's time goes on an accelerator: one traced call, summarised per step.

``trace(fn, out_dir, name)`` runs ``fn`` once under ``jax.profiler.trace`` and keeps the trace as
``out_dir/name.xplane.pb.gz`` (gunzipped, ``jax.profiler.ProfileData.from_file`` reads it on any machine,
so a GPU run's trace can be read again on the dev VM). :func:`device_stats` reads the device planes
(``/device:...``): on their stream lines, the kernels and copies, the span from the first to the last,
the time some stream was busy (the union of the intervals), the device-to-host copies (a data-dependent
while or a cond costs one each, with a host sync: XLA's while/conditional thunks) and kernel time by
name; :func:`summarize` turns a call with N decode steps minus the same call with none into figures per
step. ``jax.profiler.ProfileData`` is jaxlib's own reader: no TensorBoard or xprof needed.
"""

from __future__ import annotations

import collections
import glob
import gzip
import os
import re
import shutil
import tempfile

_COPY = re.compile(r"memcpy|memset", re.I)
_D2H = re.compile(r"d2h|dtoh|device\s*to\s*host", re.I)


def trace(fn, out_dir: str, name: str) -> bytes:
    """Run ``fn()`` once under the JAX profiler; keep the trace gzipped as ``out_dir/name.xplane.pb.gz`` and
    return it (a serialized XSpace: ``jax.profiler.ProfileData.from_serialized_xspace``)."""
    import jax

    tmp = tempfile.mkdtemp(prefix="trace_")
    try:
        with jax.profiler.trace(tmp):
            fn()
        found = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        if not found:
            raise RuntimeError(f"jax.profiler.trace wrote no .xplane.pb under {tmp}")
        with open(found[0], "rb") as f:
            raw = f.read()
        os.makedirs(out_dir, exist_ok=True)
        with gzip.open(os.path.join(out_dir, f"{name}.xplane.pb.gz"), "wb") as f:  # one file back from a device
            f.write(raw)
        return raw
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _union_ns(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by ``[start, end)`` intervals (overlaps counted once)."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + (cur_e - cur_s if cur_e is not None else 0.0)


def device_stats(planes) -> list[dict]:
    """Per device plane (``/device:...``): the stream lines' kernels and copies, their span, busy time (the
    union of the intervals), device-to-host copies, kernel time by name, and the plane's line names."""
    stats = []
    for plane in planes:
        if not plane.name.startswith("/device:"):
            continue
        lines = list(plane.lines)
        events = [e for ln in lines if ln.name.lower().startswith("stream") for e in ln.events]
        spans = [(e.start_ns, e.start_ns + e.duration_ns) for e in events]
        by_name: dict[str, list[float]] = collections.defaultdict(list)
        for e in events:
            if not _COPY.search(e.name):
                by_name[e.name].append(e.duration_ns)
        stats.append({
            "plane": plane.name,
            "lines": [(ln.name, sum(1 for _ in ln.events)) for ln in lines],
            "kernels": sum(len(v) for v in by_name.values()),
            "copies": sum(1 for e in events if _COPY.search(e.name)),
            "d2h": sum(1 for e in events if _COPY.search(e.name) and _D2H.search(e.name)),
            "span_ns": (max(e for _, e in spans) - min(s for s, _ in spans)) if spans else 0.0,
            "busy_ns": _union_ns(spans),
            "by_name": dict(by_name),
        })
    return stats


def summarize(full: list[dict], base: list[dict], steps: int, top: int = 8) -> list[str]:
    """Lines for ``steps`` decode steps: ``full`` (a call with the steps) minus ``base`` (the same call with
    none: the prefill), plane by plane (see :func:`device_stats`)."""
    if not full:
        return ["no /device: plane in the trace (a CPU run): nothing to summarise"]
    out, per = [], max(int(steps), 1)
    for f, b in zip(full, base + [None] * (len(full) - len(base))):
        b = b or {"kernels": 0, "copies": 0, "d2h": 0, "span_ns": 0.0, "busy_ns": 0.0}
        out.append(f"{f['plane']}: lines " + ", ".join(f"{n} ({c})" for n, c in f["lines"][:12]))
        if not f["kernels"]:
            out.append("  no kernels on stream lines")
            continue
        span, busy = f["span_ns"] - b["span_ns"], f["busy_ns"] - b["busy_ns"]
        out.append(f"  per decode step (({f['kernels']} - {b['kernels']} prefill) kernels / {per} steps): "
                   f"{(f['kernels'] - b['kernels']) / per:.1f} kernels, {span / per / 1e3:.1f} us from first to last, "
                   f"busy {busy / per / 1e3:.1f} us, idle {(span - busy) / per / 1e3:.1f} us "
                   f"({1 - busy / span if span > 0 else float('nan'):.0%}), "
                   f"{(f['d2h'] - b['d2h']) / per:.2f} device-to-host copies ({f['copies']} copies in all)")
        total = sum(sum(v) for v in f["by_name"].values()) or 1.0
        for name, ds in sorted(f["by_name"].items(), key=lambda kv: -sum(kv[1]))[:top]:
            out.append(f"    {sum(ds) / total:6.1%}  {len(ds):6d} x {sum(ds) / len(ds) / 1e3:8.1f} us  {name[:90]}")
    return out
