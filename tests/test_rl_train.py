"""make_train on the synthetic env: env params as jit arguments, GAE/targets against a float64
reference, learning against the random baseline, the critic fit, baselines, masks, host loops.

Each test's docstring names the mutation it catches (also listed in tests/README.md).
"""

import flax.struct as struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from teams_rl_jax.rl import PolicyConfig, PPOConfig, make_train
from teams_rl_jax.rl.algorithm import actor_critic_batch, init_params, make_network
from teams_rl_jax.rl.gae import masked_mean
from teams_rl_jax.rl.rollout import make_rollout
from teams_rl_jax.rl.testing import make_synthetic, optimal_return, random_return, synthetic_seeds
from teams_rl_jax.rl.train import make_algorithm
from teams_rl_jax.rl.trpo import trpo_update

SEED = 20260125
# Less LLVM optimisation: halves the compile time of these short runs.
FAST = {"xla_backend_optimization_level": 0}
BASE = dict(num_envs=32, hidden_sizes=(32, 32))
SHORT = (2, 5, 0)  # a 3-step optimal sequence: learnable in a few dozen updates


@pytest.fixture(scope="module")
def synth():
    env, params = make_synthetic()
    return env, params, synthetic_seeds(jax.random.PRNGKey(SEED))


def _run(train, key, params=None, seeds=None):
    rs, m = train(key, params, seeds)
    return rs, jax.tree_util.tree_map(np.asarray, m)


# ---- defect 1: env params are arguments of the compiled program ----------------------------------------
@struct.dataclass
class BigParams:
    inner: object
    weights: jax.Array  # stands in for an instructor's weights inside env_params


class BigEnv:
    """The synthetic env whose params also carry a large array that every step reads."""

    num_actions = 6

    def __init__(self, base):
        self.base = base

    def observation_size(self, p):
        return self.base.observation_size(p.inner)

    def reset(self, key, p, seeds=None):
        return self.base.reset(key, p.inner, seeds)

    def step(self, key, s, a, p):
        obs, s, r, d, info = self.base.step(key, s, a, p.inner)
        return obs, s, r + 1e-12 * p.weights[a], d, info


def test_env_params_are_jit_arguments_not_constants():
    """Mutation caught: ``make_train`` closing over ``env_params`` (the old ``train(key)``): the
    lowered program then embeds the 16 MB pytree as a constant. The positive control below builds
    exactly that closure and checks that the text does grow, so the measurement can see it."""
    env, inner = make_synthetic()
    seeds = synthetic_seeds(jax.random.PRNGKey(SEED), 8)
    cfg = PolicyConfig(algo="ppo", num_envs=4, num_steps=2, num_updates=1, hidden_sizes=(4,),
                       ppo=PPOConfig(num_minibatches=2))
    train = make_train(cfg, BigEnv(env))
    rng = np.random.default_rng(SEED)
    small = BigParams(inner, jnp.asarray(rng.standard_normal(16), jnp.float32))
    big = BigParams(inner, jnp.asarray(rng.standard_normal(4 << 20), jnp.float32))  # 16 MiB, not a splat
    key = jax.random.PRNGKey(0)
    n_small = len(jax.jit(train).lower(key, small, seeds).as_text())
    n_big = len(jax.jit(train).lower(key, big, seeds).as_text())
    assert abs(n_big - n_small) < 4096, (n_small, n_big)
    closed = len(jax.jit(lambda k: train(k, big, seeds)).lower(key).as_text())
    assert closed > n_small + (16 << 20), (n_small, closed)  # a constant would show up (hex: 2 chars/byte)


# ---- advantages and critic targets ------------------------------------------------------------------
def _numpy_gae(r, v, done, last_v, gamma, lam):
    T = r.shape[0]
    adv, ret = np.zeros_like(r), np.zeros_like(r)
    next_adv, next_v, next_ret = np.zeros_like(last_v), last_v, last_v
    for t in reversed(range(T)):
        nd = 1.0 - done[t]
        delta = r[t] + gamma * next_v * nd - v[t]
        adv[t] = delta + gamma * lam * nd * next_adv
        ret[t] = r[t] + gamma * nd * next_ret
        next_adv, next_v, next_ret = adv[t], v[t], ret[t]
    return adv, adv + v, ret


@pytest.mark.parametrize("algo", ["ppo", "trpo"])
def test_batch_advantages_and_targets_match_float64_reference(algo):
    """Mutations caught: GAE with lambda ignored (forced to 0 or 1), a flipped advantage sign,
    bootstrapping through a ``done`` or a masked step, a cut rollout not bootstrapped with the last
    value, TRPO's critic targets not the discounted returns (or PPO's not GAE targets)."""
    env, env_params = make_synthetic(terminate_action=0)  # op 0 ends an episode: dones mid-rollout
    seeds = synthetic_seeds(jax.random.PRNGKey(SEED), 8)
    # num_steps 4 < horizon 6: unfinished episodes are bootstrapped with the critic's last value.
    cfg = PolicyConfig(algo=algo, num_envs=16, num_steps=4, gamma=0.9, gae_lambda=0.7, normalize_advantages=False,
                       hidden_sizes=(16,))
    network = make_network(cfg, env.num_actions)
    params = init_params(network, jax.random.PRNGKey(SEED), env.observation_size(env_params))
    _, _, rollout = make_rollout(cfg, env, make_algorithm(cfg, env).act)
    last, traj = rollout(params, jax.random.PRNGKey(SEED + 1), env_params, seeds)
    batch = actor_critic_batch(cfg, network, params, traj, last, jnp.zeros(()), returns_targets=(algo == "trpo"))

    f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    done = f64(np.asarray(traj.done) | (np.asarray(traj.valid) == 0))
    last_v = f64(network.apply(params, last.obs, method="value")) * f64(last.alive)
    assert done[:-1].any() and (f64(last.alive) > 0).any(), f"seed {SEED}: need both dones and cut episodes"
    adv, gae_targets, returns = _numpy_gae(f64(traj.reward), f64(traj.value), done, last_v, 0.9, 0.7)
    T, N = adv.shape
    np.testing.assert_allclose(np.asarray(batch.advantages).reshape(T, N), adv, rtol=1e-5, atol=1e-6,
                               err_msg=f"seed {SEED}")
    want = returns if algo == "trpo" else gae_targets
    np.testing.assert_allclose(np.asarray(batch.targets).reshape(T, N), want, rtol=1e-5, atol=1e-6,
                               err_msg=f"seed {SEED}")
    # lambda matters on this data (else the comparison could not tell lambda from 0).
    adv0, _, _ = _numpy_gae(f64(traj.reward), f64(traj.value), done, last_v, 0.9, 0.0)
    assert np.abs(adv0 - adv).max() > 1e-2


def test_trpo_critic_fit_reduces_value_error():
    """Mutation caught: a broken critic fit (the L-BFGS step dropped, the fit skipped, the targets
    or the L2 sign wrong): after one TRPO update the critic must predict the targets better than the
    best constant (their mean: error = their variance) and better than before the update by far.
    The returns of a random policy are noisy, so no fit can explain all of their variance."""
    env, env_params = make_synthetic(optimal=SHORT)
    seeds = synthetic_seeds(jax.random.PRNGKey(SEED), 8)
    cfg = PolicyConfig(algo="trpo", num_envs=64, num_steps=3, hidden_sizes=(32, 32))
    network = make_network(cfg, env.num_actions)
    params = init_params(network, jax.random.PRNGKey(SEED), env.observation_size(env_params))
    _, _, rollout = make_rollout(cfg, env, make_algorithm(cfg, env).act)
    last, traj = rollout(params, jax.random.PRNGKey(SEED + 2), env_params, seeds)
    batch = actor_critic_batch(cfg, network, params, traj, last, jnp.zeros(()), returns_targets=True)
    new, metrics = jax.jit(lambda p, b: trpo_update(network, p, b, cfg.trpo), compiler_options=FAST)(params, batch)
    err = lambda p: float(masked_mean(jnp.square(network.apply(p, batch.obs, method="value") - batch.targets),  # noqa: E731
                                      batch.weights))
    var = float(masked_mean(jnp.square(batch.targets - masked_mean(batch.targets, batch.weights)), batch.weights))
    assert var > 0.05, f"seed {SEED}: targets without variance cannot test the fit"
    before, after = err(params), err(new)
    msg = f"seed {SEED}: value error {before:.4f} -> {after:.4f}, target variance {var:.4f}"
    assert after < var and after < 0.6 * before, msg


# ---- learning --------------------------------------------------------------------------------------
def _random_mean(env, env_params, seeds, updates=10):
    cfg = PolicyConfig(algo="random", num_updates=updates, num_steps=len(SHORT), **BASE)
    _, m = _run(jax.jit(make_train(cfg, env)), jax.random.PRNGKey(SEED), env_params, seeds)
    return float(m["return"].mean()), float(m["return"].std() / np.sqrt(updates))


@pytest.mark.parametrize("algo", ["trpo", "ppo"])
def test_learning_beats_random_and_its_own_start(algo):
    """Mutations caught: a flipped advantage sign or surrogate sign (the policy then learns to avoid
    reward: its return falls to or below random), advantages that ignore the action (no learning),
    a policy step that is never applied. Compared with the random baseline on the same env and the
    same number of episodes (not with a reach threshold set from measured runs). PPO runs two seeds
    under ``jit(vmap(train))`` with the env params unbatched."""
    env, env_params = make_synthetic(optimal=SHORT)
    seeds = synthetic_seeds(jax.random.PRNGKey(SEED), 16)
    rand_mean, rand_se = _random_mean(env, env_params, seeds)
    assert abs(rand_mean - random_return(env_params)) < 0.1  # the baseline is what theory says
    if algo == "trpo":
        cfg = PolicyConfig(algo="trpo", num_updates=30, num_steps=len(SHORT), **BASE)
        _, m = _run(jax.jit(make_train(cfg, env), compiler_options=FAST), jax.random.PRNGKey(SEED), env_params, seeds)
        returns = m["return"][None]
    else:
        cfg = PolicyConfig(algo="ppo", num_updates=30, num_steps=len(SHORT), ppo=PPOConfig(lr=3e-3, num_minibatches=2),
                           **BASE)
        keys = jax.random.split(jax.random.PRNGKey(SEED), 2)
        train = jax.jit(jax.vmap(make_train(cfg, env), in_axes=(0, None, None)), compiler_options=FAST)
        rs, m = _run(train, keys, env_params, seeds)
        assert np.all(np.asarray(rs.update) == cfg.num_updates)
        returns = m["return"]
        assert not np.allclose(returns[0], returns[1])  # the seeds really differ
    for s, ret in enumerate(returns):
        final, start = ret[-5:].mean(), ret[:3].mean()
        msg = f"{algo} seed {SEED}/{s}: returns {np.round(ret[::3], 2)}, random {rand_mean:.3f}"
        # Half of the way from random to optimal, and far above random's noise and its own start.
        assert final > rand_mean + 0.5 * (optimal_return(env_params) - rand_mean), msg
        assert final > start + 10 * rand_se + 0.5, msg


# ---- baselines, masks, loops ------------------------------------------------------------------------
def test_random_baseline_matches_expected_return(synth):
    """Mutation caught: a biased 'uniform' choice (e.g. ignoring the mask or always action 0), or
    queries counted on steps that were not taken."""
    env, params, seeds = synth
    cfg = PolicyConfig(algo="random", num_updates=10, num_steps=6, **BASE)
    _, m = _run(jax.jit(make_train(cfg, env)), jax.random.PRNGKey(SEED), params, seeds)
    # 320 episodes: the mean return is within a few standard errors of 1/6 + 5/36.
    assert abs(float(np.mean(m["return"])) - random_return(params)) < 0.08, f"seed {SEED}"
    np.testing.assert_allclose(m["op_histogram"].mean(0), 1 / 6, atol=0.03, err_msg=f"seed {SEED}")
    np.testing.assert_allclose(m["queries"]["instructor"], 6.0)
    assert "kl" not in m  # a baseline does not learn: no KL is reported (it used to be a hard-coded 0)


def test_paper_schedule_through_make_train(synth):
    """Mutation caught: the paper schedule's breadth steps moved or the schedule table ignored."""
    env, params, seeds = synth
    cfg = PolicyConfig(algo="fixed", schedule=("paper",), num_updates=2, num_steps=6, **BASE)
    _, m = _run(jax.jit(make_train(cfg, env)), jax.random.PRNGKey(SEED), params, seeds)
    by_step = m["op_by_step"][-1]
    assert list(by_step.argmax(-1)) == [0, 5, 0, 0, 5, 0]  # add_constraints, breadth at steps 1 and 4
    np.testing.assert_allclose(by_step.max(-1), 1.0)
    np.testing.assert_allclose(m["op_histogram"][-1][[0, 5]], [4 / 6, 2 / 6], rtol=1e-6)


def test_masks_early_termination_and_host_step_loop():
    """Mutations caught: the env's action mask or ``disabled_ops`` ignored, steps after ``done``
    counted (queries, length), the host-step loop not stopping or not calling ``on_update``."""
    # Op 3 is disabled by the env's mask hook, op 1 by config; op 0 ends the episode at once.
    env, params = make_synthetic(allowed=(True, True, True, False, True, True), terminate_action=0,
                                 query_costs=(0, 0, 2, 0, 0, 0))
    cfg = PolicyConfig(algo="ppo", num_updates=3, num_envs=16, disabled_ops=("deepening",),
                       hidden_sizes=(8,), loop="host", host_rollout="step", ppo=PPOConfig(num_minibatches=2))
    seen = []
    _, m = make_train(cfg, env, on_update=lambda i, mm: seen.append(i))(jax.random.PRNGKey(SEED), params)
    assert seen == [0, 1, 2]
    assert np.all(m["op_histogram"][:, [1, 3]] == 0)
    assert np.all(m["episode_length"] < 6) and np.all(m["episode_length"] >= 1)
    # Queries are only counted on valid steps: one instructor query per step taken.
    np.testing.assert_allclose(m["queries"]["instructor"], m["episode_length"], rtol=1e-6)
    np.testing.assert_allclose(m["queries"]["reviewer"], 2 * m["op_histogram"][:, 2] * m["episode_length"], rtol=1e-5)
    for k in ("policy_loss", "value_loss", "entropy", "kl"):
        assert np.all(np.isfinite(m[k])), k


def test_host_scan_loop_equals_jit_loop(synth):
    """Mutation caught: the host loop passing different keys or env params than the jitted loop."""
    env, params, seeds = synth
    cfg = PolicyConfig(algo="random", num_updates=3, num_steps=6, **BASE)
    _, m_jit = _run(jax.jit(make_train(cfg, env)), jax.random.PRNGKey(SEED), params, seeds)
    _, m_host = make_train(cfg.replace(loop="host"), env)(jax.random.PRNGKey(SEED), params, seeds)
    np.testing.assert_allclose(m_jit["return"], m_host["return"])
    np.testing.assert_allclose(m_jit["op_by_step"], m_host["op_by_step"])
