"""Every file in ``configs/`` runs through ``python -m teams_rl_jax.train``, at tiny scale.

Each config is run as a user would run it, with only three kinds of change given by ``--set``:

* paths swapped for tiny fixtures (:mod:`tiny_pipeline`), read off the YAML itself: every
  ``roles.<role>.checkpoint`` and ``sft.model.path`` -> one tiny random Llama dir; every
  ``roles.<role>.base_url`` (+ ``model``) -> one real ``python -m teams_rl_jax.serve`` of that
  model on loopback (bearer key in the variable the config names); ``eval.benchmarks.data_dir`` ->
  one document per task; ``--run-dir`` -> the test's tmp dir;
* sizes shrunk, per config, in ``tiny_pipeline.SHRINK`` (a config missing there fails, asking for an entry);
* the device count: a config whose meshes ask for several devices runs on 8 simulated CPU devices
  (``--xla_force_host_platform_device_count``), so its mesh values are used as written.

The test fails when any shipped config cannot run, or leaves no artifact of a stage it lists.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import tiny_pipeline as T

ROOT = T.ROOT
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SHRINK = T.SHRINK


def train_command(config: Path, run_dir: Path, sets: list[str]) -> list[str]:
    return [sys.executable, "-m", "teams_rl_jax.train", "--config", str(config), "--run-dir", str(run_dir),
            *T.set_args(sets)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """One tiny checkpoint dir for every config (and for the server)."""
    return T.tiny_checkpoint(tmp_path_factory.mktemp("shipped") / "tiny-llama", seed=0)


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory) -> Path:
    return T.benchmark_dir(tmp_path_factory.mktemp("benchmarks"))


@pytest.fixture(scope="module")
def base_url(checkpoint, tmp_path_factory):
    """One server for every config with an endpoint (started only if a config asks for one)."""
    with T.serve(checkpoint, tmp_path_factory.mktemp("serve") / "serve.log") as url:
        yield url


def test_every_config_has_a_shrink_entry():
    missing = [p.name for p in CONFIGS if p.name not in SHRINK]
    assert not missing, (f"configs without a tiny-scale entry: {missing}; add one to SHRINK in "
                         f"{Path(__file__).name} (size overrides, device count) so the config is run")
    stale = sorted(set(SHRINK) - {p.name for p in CONFIGS})
    assert not stale, f"SHRINK names configs that no longer exist: {stale}"


def _param(path: Path):
    entry = SHRINK.get(path.name)
    marks = [pytest.mark.xfail(strict=True, reason=entry.xfail)] if entry is not None and entry.xfail else []
    return pytest.param(path, id=path.stem, marks=marks)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("config", [_param(p) for p in CONFIGS])
def test_shipped_config_runs(config, checkpoint, benchmarks, request, tmp_path):
    """Catches: a shipped config that loads but cannot run (a wrong key value, a stage needing an input
    the config does not provide, a mesh its model cannot be sharded over, a role the env cannot use)."""
    entry = SHRINK.get(config.name)
    assert entry is not None, f"{config.name}: add a tiny-scale entry to SHRINK in tests/tiny_pipeline.py"
    cfg = yaml.safe_load(config.read_text())
    url = request.getfixturevalue("base_url") if T.needs_server(cfg) else None
    run_dir = tmp_path / "run"
    cmd = train_command(config, run_dir, T.path_swaps(cfg, checkpoint, url, benchmarks) + entry.sets)
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=840,
                       env=T.cpu_env(entry.devices, **{T.API_KEY_ENV: T.API_KEY}))
    print(f"{config.name}: {time.time() - t0:.0f} s\n{' '.join(cmd)}\n{p.stdout[-3000:]}")
    assert p.returncode == 0, f"{config.name} failed (exit {p.returncode}):\n{p.stderr[-4000:]}"
    stages = cfg.get("stages") or list(T.ARTIFACTS)
    missing = [T.ARTIFACTS[s] for s in stages if not (run_dir / T.ARTIFACTS[s]).is_file()]
    assert not missing, f"{config.name}: stages listed but artifacts missing: {missing}"
    assert T.API_KEY not in p.stdout + p.stderr + (run_dir / "config.yaml").read_text()
