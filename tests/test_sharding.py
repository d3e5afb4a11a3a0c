"""Sharded (data=2, fsdp=2, tensor=2) forward and generate on 8 simulated CPU devices."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from teams_rl_jax.errors import ConfigError
from teams_rl_jax import sharding as shd
from teams_rl_jax.sharding import make_mesh

# Called as a module attribute (as param_shardings does), so ../shared/tools/mutate.py reaches it.
logical_to_spec = lambda *a, **k: shd.logical_to_spec(*a, **k)  # noqa: E731


def test_sharded_forward_equals_unsharded(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "sharding_check.py"), str(tmp_path / "ckpt")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("OK")


def test_logical_rules_and_divisibility():
    """Catches: a dimension that does not divide its mesh axis sharded anyway (jax would refuse the
    device_put, or pad silently), a divisible one left replicated, a mesh axis used twice in one array."""
    import jax
    from jax.sharding import AbstractMesh

    # An abstract (2, 2, 4) mesh: the rules need only the axis sizes, not 16 devices.
    m = AbstractMesh((2, 2, 4), ("data", "fsdp", "tensor"))
    # vocab 32001 (Llama-2 + 1 added token) on tensor=4: that dimension falls back to replicated,
    # embed (4096 on fsdp=2) stays sharded.
    assert tuple(logical_to_spec(("vocab", "embed"), mesh=m, shape=(32001, 4096))) == (None, "fsdp")
    assert tuple(logical_to_spec(("vocab", "embed"), mesh=m, shape=(32000, 4096))) == ("tensor", "fsdp")
    assert tuple(logical_to_spec(("embed", "vocab"), mesh=m, shape=(4095, 32000))) == (None, "tensor")
    # 2 KV heads x 3 dims = 6 on tensor=4: replicated; the stacked layer axis is never sharded.
    assert tuple(logical_to_spec(("layers", "embed", "kv_heads"), mesh=m, shape=(2, 64, 6))) == (None, "fsdp", None)
    # A batch of 6 rows does not divide data*fsdp = 4: the whole batch dimension is replicated.
    assert tuple(logical_to_spec(("activation_batch", "activation_length"), mesh=m, shape=(6, 64))) == (None, None)
    assert tuple(logical_to_spec(("activation_batch", "activation_length"), mesh=m, shape=(8, 64))) == (
        ("data", "fsdp"), None)
    # Size-1 mesh axes are dropped (nothing to split over).
    m1 = AbstractMesh((8, 1, 1), ("data", "fsdp", "tensor"))
    assert tuple(logical_to_spec(("vocab", "embed"), mesh=m1, shape=(32000, 4096))) == (None, None)

    mesh = make_mesh(data=-1)
    assert mesh.shape["data"] == jax.device_count()
    spec = logical_to_spec(("layers", "embed", "heads"))
    assert tuple(spec) == (None, "fsdp", "tensor")
    # A mesh axis is used at most once per array.
    assert tuple(logical_to_spec(("heads", "mlp"))) == ("tensor", None)
    with pytest.raises(ConfigError, match="devices"):
        make_mesh(data=3, fsdp=5)
