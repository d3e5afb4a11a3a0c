"""``benchmarks/_profile.py``: the per-decode-step device profile that ``bench_generate.py --profile-dir`` prints.

The GPU trace it is written for cannot be made here, so the device-side arithmetic is checked on an XSpace
built with jaxlib's own text-proto reader (``ProfileData.from_text_proto``), shaped like the CUPTI planes of
a GPU trace (``/device:GPU:0``, one line per stream, an ``XLA Ops`` line that repeats the ops and must not
be counted as kernels); the capture path runs for real on the CPU.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.profiler import ProfileData

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import _profile  # noqa: E402

_META = {"prefill": 1, "gemm": 2, "fusion": 3, "MemcpyD2H": 4}


def _xspace(steps: int) -> ProfileData:
    """A prefill kernel [0, 10) us, then per step k (t = 10 + 10k us): gemm [t+1, t+6), fusion [t+6, t+8) on
    the compute stream and a device-to-host copy [t+8.5, t+9.5) on another; ``XLA Ops`` spans everything."""
    compute, copies = ["events { metadata_id: 1 offset_ps: 0 duration_ps: 10000000 }"], []
    for k in range(steps):
        t = 10_000 + 10_000 * k  # ns
        compute += [f"events {{ metadata_id: 2 offset_ps: {(t + 1000) * 1000} duration_ps: 5000000 }}",
                    f"events {{ metadata_id: 3 offset_ps: {(t + 6000) * 1000} duration_ps: 2000000 }}"]
        copies.append(f"events {{ metadata_id: 4 offset_ps: {(t + 8500) * 1000} duration_ps: 1000000 }}")
    meta = "\n".join(f'event_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}' for n, i in _META.items())
    return ProfileData.from_text_proto(f"""
planes {{ id: 1 name: "/device:GPU:0"
  lines {{ id: 1 name: "Stream #14(Compute)" timestamp_ns: 0 {' '.join(compute)} }}
  lines {{ id: 2 name: "Stream #20(MemcpyD2H)" timestamp_ns: 0 {' '.join(copies)} }}
  lines {{ id: 3 name: "XLA Ops" timestamp_ns: 0 events {{ metadata_id: 2 offset_ps: 0 duration_ps: 99000000 }} }}
  {meta}
}}
planes {{ id: 2 name: "/host:CPU" }}
""")


def test_device_stats_count_stream_kernels_busy_union_and_device_to_host_copies():
    """4 steps: 1 + 8 kernels, 4 copies (all device-to-host), span 49.5 us, busy 42 us (the union: the copy
    on its own stream counts once), the ``XLA Ops`` line and the host plane left out. Per step after the
    prefill-only trace is subtracted: 2 kernels, 9.875 us first to last, 8 us busy, 1.875 us idle, one
    device-to-host copy. Mutations caught (mutate.py / by hand): overlapping intervals counted twice in
    ``_union_ns``; every line counted (``XLA Ops`` as kernels); copies counted as kernels; the prefill not
    subtracted."""
    full = _profile.device_stats(_xspace(4).planes)
    base = _profile.device_stats(_xspace(0).planes)
    assert len(full) == 1 and full[0]["plane"] == "/device:GPU:0"
    f = full[0]
    assert (f["kernels"], f["copies"], f["d2h"]) == (9, 4, 4)
    assert (f["span_ns"], f["busy_ns"]) == (49_500.0, 42_000.0)
    assert {k: len(v) for k, v in f["by_name"].items()} == {"prefill": 1, "gemm": 4, "fusion": 4}
    lines = _profile.summarize(full, base, 4)
    head = next(line for line in lines if "per decode step" in line)
    for want in ("2.0 kernels", "9.9 us from first to last", "busy 8.0 us", "idle 1.9 us", "(19%)",
                 "1.00 device-to-host copies"):
        assert want in head, (want, head)
    ranked = [line.split()[-1] for line in lines if line.startswith("    ")]
    assert ranked == ["gemm", "prefill", "fusion"], lines  # 20 / 10 / 8 us of kernel time


def test_union_of_intervals():
    assert _profile._union_ns([]) == 0.0
    assert _profile._union_ns([(0, 5), (3, 8), (10, 12), (11, 11.5)]) == 10.0
    assert _profile._union_ns([(4, 6), (0, 10)]) == 10.0


def test_trace_keeps_a_gzipped_xspace_and_a_cpu_trace_has_no_device_plane(tmp_path):
    """The capture path, for real on the CPU: the returned bytes and the kept ``.gz`` are the same XSpace,
    and with no ``/device:`` plane the summary says so instead of inventing figures."""
    f = jax.jit(lambda x: jnp.tanh(x) @ x)
    x = jnp.ones((64, 64))
    f(x).block_until_ready()
    raw = _profile.trace(lambda: np.asarray(f(x)), str(tmp_path), "t")
    kept = gzip.decompress((tmp_path / "t.xplane.pb.gz").read_bytes())
    assert kept == raw and list(tmp_path.iterdir()) == [tmp_path / "t.xplane.pb.gz"]
    planes = ProfileData.from_serialized_xspace(raw).planes
    assert any(p.name.startswith("/host:") for p in planes)
    stats = _profile.device_stats(planes)
    assert stats == [] and "no /device: plane" in _profile.summarize(stats, stats, 3)[0]
