"""make_train on the synthetic env: learning (TRPO, PPO vs random), jit + vmap over seeds, host loops,
baselines, masks and early termination, the query-budget Lagrangian."""

import jax
import numpy as np
import pytest

from teams_rl_jax.rl import PolicyConfig, PPOConfig, QueryBudgetConfig, make_train
from teams_rl_jax.rl.testing import make_synthetic, optimal_return, random_return, synthetic_seeds

# Small nets and rollouts keep compile + run to a few seconds per algorithm on CPU.
BASE = dict(num_envs=32, num_steps=6, hidden_sizes=(32, 32))
# Updates until the 3-update moving average of the return first reaches 90% of the optimum, over 8
# seeds: TRPO (max_kl 0.01) 55-67, PPO (lr 3e-3) 26-31. The bounds below leave a margin for numerics.
TRPO_UPDATES, TRPO_REACH = 100, 80
PPO_UPDATES, PPO_REACH = 60, 45
# Less LLVM optimisation: halves PPO's compile time; its runs are short anyway.
FAST = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def synth():
    env, params = make_synthetic()
    return env, params, synthetic_seeds(jax.random.PRNGKey(123))


def _run(train, key):
    rs, m = train(key)
    return rs, jax.tree_util.tree_map(np.asarray, m)


def _first_reaching(returns, target, window=3):
    """1-based update at which the moving average of ``window`` updates first reaches ``target``."""
    avg = np.convolve(np.asarray(returns), np.ones(window) / window, mode="valid")
    hit = np.nonzero(avg >= target)[0]
    return int(hit[0]) + window if hit.size else None


@pytest.fixture(scope="module")
def random_result(synth):
    env, params, seeds = synth
    cfg = PolicyConfig(algo="random", num_updates=10, **BASE)
    _, m = _run(jax.jit(make_train(cfg, env, params, seeds)), jax.random.PRNGKey(0))
    return m


def test_random_baseline_matches_expected_return(synth, random_result):
    _, params, _ = synth
    # 320 episodes: the mean return is within a few standard errors of 1/6 + 5/36.
    assert abs(float(np.mean(random_result["return"])) - random_return(params)) < 0.08
    np.testing.assert_allclose(random_result["op_histogram"].mean(0), 1 / 6, atol=0.03)
    np.testing.assert_allclose(random_result["queries"]["instructor"], 6.0)
    assert np.all(random_result["kl"] == 0)


def test_trpo_learns_optimal_sequence(synth, random_result):
    env, params, seeds = synth
    cfg = PolicyConfig(algo="trpo", num_updates=TRPO_UPDATES, **BASE)
    _, m = _run(jax.jit(make_train(cfg, env, params, seeds)), jax.random.PRNGKey(0))
    ret = np.asarray(m["return"])
    target = 0.9 * optimal_return(params)
    reached = _first_reaching(ret, target)
    assert reached is not None and reached <= TRPO_REACH, f"TRPO returns {np.round(ret[::10], 2)}"
    assert ret[-10:].mean() >= target  # and stays there
    assert ret[-10:].mean() > float(np.mean(random_result["return"])) + 3.0
    # Every update stayed inside the trust region and improved the surrogate (or was rejected).
    assert np.all(m["kl"] <= 1.5 * cfg.trpo.max_kl)
    acc = m["linesearch_accepted"] > 0
    assert acc.mean() > 0.9 and np.all(m["surrogate_improvement"][acc] > 0)
    # The learned policy follows the optimal sequence step by step.
    greedy_by_step = m["op_by_step"][-1].argmax(-1)
    assert list(greedy_by_step) == list(np.asarray(params.optimal))
    print(f"TRPO reached {target:.1f} at update {reached}")


def test_ppo_learns_jit_vmap_two_seeds(synth, random_result):
    env, params, seeds = synth
    cfg = PolicyConfig(algo="ppo", num_updates=PPO_UPDATES, ppo=PPOConfig(lr=3e-3), **BASE)
    train = make_train(cfg, env, params, seeds)
    keys = jax.random.split(jax.random.PRNGKey(7), 2)
    rs, m = _run(jax.jit(jax.vmap(train), compiler_options=FAST), keys)
    assert m["return"].shape == (2, PPO_UPDATES)
    assert m["op_by_step"].shape == (2, PPO_UPDATES, 6, 6)
    assert rs.update.shape == (2,) and np.all(np.asarray(rs.update) == PPO_UPDATES)
    assert not np.allclose(m["return"][0], m["return"][1])  # seeds really differ
    target = 0.9 * optimal_return(params)
    for s in range(2):
        ret = m["return"][s]
        reached = _first_reaching(ret, target)
        assert reached is not None and reached <= PPO_REACH, f"PPO seed {s} returns {np.round(ret[::5], 2)}"
        assert ret[-10:].mean() >= target
        assert ret[-10:].mean() > float(np.mean(random_result["return"])) + 3.0
        print(f"PPO seed {s} reached {target:.1f} at update {reached}")


def test_paper_schedule_through_make_train(synth):
    env, params, seeds = synth
    cfg = PolicyConfig(algo="fixed", schedule=("paper",), num_updates=2, **BASE)
    _, m = _run(jax.jit(make_train(cfg, env, params, seeds)), jax.random.PRNGKey(0))
    by_step = m["op_by_step"][-1]
    assert list(by_step.argmax(-1)) == [0, 5, 0, 0, 5, 0]  # add_constraints, breadth at steps 1 and 4
    np.testing.assert_allclose(by_step.max(-1), 1.0)
    np.testing.assert_allclose(m["op_histogram"][-1][[0, 5]], [4 / 6, 2 / 6], rtol=1e-6)


def test_masks_early_termination_and_host_step_loop():
    # Op 3 is disabled by the env's mask hook, op 1 by config; op 0 ends the episode at once.
    env, params = make_synthetic(allowed=(True, True, True, False, True, True), terminate_action=0,
                                 query_costs=(0, 0, 2, 0, 0, 0))
    cfg = PolicyConfig(algo="ppo", num_updates=3, num_envs=16, disabled_ops=("deepening",),
                       hidden_sizes=(8,), loop="host", host_rollout="step", ppo=PPOConfig(num_minibatches=2))
    seen = []
    _, m = make_train(cfg, env, params, on_update=lambda i, mm: seen.append(i))(jax.random.PRNGKey(1))
    assert seen == [0, 1, 2]
    assert np.all(m["op_histogram"][:, [1, 3]] == 0)
    assert np.all(m["episode_length"] < 6) and np.all(m["episode_length"] >= 1)
    # Queries are only counted on valid steps: one instructor query per step taken.
    np.testing.assert_allclose(m["queries"]["instructor"], m["episode_length"], rtol=1e-6)
    np.testing.assert_allclose(m["queries"]["reviewer"], 2 * m["op_histogram"][:, 2] * m["episode_length"], rtol=1e-5)
    for k in ("policy_loss", "value_loss", "entropy", "kl"):
        assert np.all(np.isfinite(m[k])), k


def test_host_scan_loop_equals_jit_loop(synth):
    env, params, seeds = synth
    cfg = PolicyConfig(algo="random", num_updates=3, **BASE)
    _, m_jit = _run(jax.jit(make_train(cfg, env, params, seeds)), jax.random.PRNGKey(5))
    _, m_host = make_train(cfg.replace(loop="host"), env, params, seeds)(jax.random.PRNGKey(5))
    np.testing.assert_allclose(m_jit["return"], m_host["return"])
    np.testing.assert_allclose(m_jit["op_by_step"], m_host["op_by_step"])


def test_query_budget_lagrangian_reduces_queries():
    # Reviewer queries cost 1 for ops 5 and 1, both on the optimal path: unconstrained, the optimal
    # policy spends 2 per episode. A budget of 0.5 must push the multiplier up and queries down.
    env, params = make_synthetic(query_costs=(0, 1, 0, 0, 0, 1))
    seeds = synthetic_seeds(jax.random.PRNGKey(0))
    budget = QueryBudgetConfig(budget=0.5, roles=("reviewer",), lr=0.1)
    cfg = PolicyConfig(algo="ppo", num_updates=40, ppo=PPOConfig(lr=3e-3), queries=budget, **BASE)
    _, m = _run(jax.jit(make_train(cfg, env, params, seeds), compiler_options=FAST), jax.random.PRNGKey(0))
    assert np.all(m["lagrange"] >= 0)
    assert m["lagrange"][10:].max() > 0.5  # grew while over budget
    assert m["cost"][-5:].mean() <= 0.5 + 0.25  # at the budget, far below the unconstrained 2 per episode
    assert m["return"][-5:].mean() > 1.0  # and still better than random under the constraint
    np.testing.assert_allclose(m["cost"], m["queries"]["reviewer"])
