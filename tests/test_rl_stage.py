"""The policy stage end to end on the synthetic env: artifacts, Orbax round trip, baselines."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from teams_rl_jax.errors import CheckpointError
from teams_rl_jax.rl import PolicyConfig, PPOConfig, policy_action
from teams_rl_jax.rl.checkpoint import load_policy
from teams_rl_jax.rl.stage import run_policy_stage


def test_policy_stage_writes_artifacts_and_reloads(tmp_path):
    cfg = PolicyConfig(algo="ppo", env="synthetic", num_envs=16, num_updates=4, hidden_sizes=(8,),
                       ppo=PPOConfig(lr=3e-3), compare=("random", "paper"))
    logs = []
    summary = run_policy_stage(cfg, tmp_path, log=logs.append)
    out = tmp_path / "policy"
    for name in ("curves.jsonl", "curves_random.jsonl", "curves_paper.jsonl", "curves.png", "op_histogram.json",
                 "op_histogram.png", "summary.json", "policy.json", "checkpoint"):
        assert (out / name).exists(), name
    rows = [json.loads(line) for line in (out / "curves.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]["queries"]) == {"instructor", "reviewer"}
    assert rows[-1]["cumulative_queries"] == pytest.approx(4 * 16 * 6)  # 6 instructor queries per episode
    assert sum(rows[0]["op_histogram"].values()) == pytest.approx(1.0)
    hist = json.loads((out / "op_histogram.json").read_text())
    assert hist["paper"]["final"]["breadth"] == pytest.approx(2 / 6)
    assert set(summary["baselines"]) == {"random", "paper"}
    assert summary["policy"]["total_queries"] == summary["baselines"]["random"]["total_queries"]  # equal budgets
    assert any("update 4/4" in line for line in logs)

    network, params, meta = load_policy(tmp_path)
    assert meta["algo"] == "ppo" and meta["obs_dim"] == 15
    obs = jax.random.normal(jax.random.PRNGKey(0), (4, meta["obs_dim"]))
    acts = policy_action(network, params, jax.random.PRNGKey(1), obs, greedy=True)
    assert acts.shape == (4,) and acts.dtype == jnp.int32
    assert np.all((np.asarray(acts) >= 0) & (np.asarray(acts) < 6))


def test_load_policy_errors(tmp_path):
    with pytest.raises(CheckpointError):
        load_policy(tmp_path)
    cfg = PolicyConfig(algo="random", env="synthetic", num_envs=4, num_updates=1, compare=())
    run_policy_stage(cfg, tmp_path, log=lambda s: None)
    with pytest.raises(CheckpointError, match="baseline"):
        load_policy(tmp_path)
