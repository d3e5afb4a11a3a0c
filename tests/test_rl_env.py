"""Integration: the policy stage on the real token-edit env (teams_rl_jax.env.make("token_edit"))."""

import json

import jax
import numpy as np

from teams_rl_jax.env import OPERATIONS
from teams_rl_jax.rl import PolicyConfig, PPOConfig, policy_action
from teams_rl_jax.rl.stage import load_policy, run_policy_stage


def test_policy_stage_on_token_edit_env(tmp_path):
    cfg = PolicyConfig(algo="ppo", env="token_edit", num_envs=8, num_steps=6, num_updates=3, hidden_sizes=(16,),
                       ppo=PPOConfig(num_minibatches=2, lr=3e-3), compare=())
    logs = []
    summary = run_policy_stage(cfg, tmp_path, log=logs.append)
    rows = [json.loads(line) for line in (tmp_path / "policy" / "curves.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and not any("note:" in line for line in logs)
    for r in rows:
        assert r["episode_length"] == 6.0  # six evolution steps, no early termination by default
        assert np.isfinite([r["return"], r["kl"], r["policy_loss"], r["value_loss"], r["entropy"]]).all()
        assert set(r["queries"]) >= {"instructor", "reviewer"}  # token edits cost 0 queries
        assert list(r["op_histogram"]) == list(OPERATIONS)
        assert abs(sum(r["op_histogram"].values()) - 1.0) < 1e-5
    assert np.isfinite(summary["policy"]["final_return"])

    network, params, meta = load_policy(tmp_path / "policy")
    assert meta["operations"] == list(OPERATIONS)
    obs = jax.random.normal(jax.random.PRNGKey(0), (3, meta["obs_dim"]))
    acts = np.asarray(policy_action(network, params, jax.random.PRNGKey(1), obs))
    assert acts.shape == (3,) and ((acts >= 0) & (acts < len(OPERATIONS))).all()
