"""Sharded (data=2, fsdp=2, tensor=2) forward and generate on 8 simulated CPU devices."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from teams_rl_jax.errors import ConfigError
from teams_rl_jax.sharding import logical_to_spec, make_mesh


def test_sharded_forward_equals_unsharded(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "sharding_check.py"), str(tmp_path / "ckpt")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("OK")


def test_logical_rules_and_divisibility():
    import jax

    mesh = make_mesh(data=-1)
    assert mesh.shape["data"] == jax.device_count()
    spec = logical_to_spec(("layers", "embed", "heads"))
    assert tuple(spec) == (None, "fsdp", "tensor")
    # A mesh axis is used at most once per array.
    assert tuple(logical_to_spec(("heads", "mlp"))) == ("tensor", None)
    with pytest.raises(ConfigError, match="devices"):
        make_mesh(data=3, fsdp=5)
