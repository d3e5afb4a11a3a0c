"""Unit tests of the RL pieces: GAE, conjugate gradient, Fisher-vector products, TRPO step, PPO clip,
baseline schedules and the policy config."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rng as seeded_rng
from jax.flatten_util import ravel_pytree

from teams_rl_jax import config as cfglib
from teams_rl_jax.errors import ConfigError
from teams_rl_jax.models import policy as P
from teams_rl_jax.rl import PolicyConfig, TRPOConfig, baselines as B
from teams_rl_jax.rl.gae import normalize
from teams_rl_jax.rl.ppo import clipped_surrogate
from teams_rl_jax.rl.trpo import Batch, trpo_update

# The GAE module itself (the package re-exports a function of the same name).
# Unit tests call functions as module attributes, as their callers do, so that
# ../shared/tools/mutate.py (which swaps module attributes) reaches them too.
G = importlib.import_module("teams_rl_jax.rl.gae")
TR = importlib.import_module("teams_rl_jax.rl.trpo")

# Less LLVM optimisation: these functions run once, so compile time is what matters.
FAST = {"xla_backend_optimization_level": 0}


def _np_gae(rewards, values, dones, last_value, gamma, lam):
    T, N = rewards.shape
    adv = np.zeros((T, N))
    for n in range(N):
        next_adv, next_value = 0.0, last_value[n]
        for t in reversed(range(T)):
            nd = 1.0 - dones[t, n]
            delta = rewards[t, n] + gamma * next_value * nd - values[t, n]
            next_adv = delta + gamma * lam * nd * next_adv
            next_value = values[t, n]
            adv[t, n] = next_adv
    return adv


def test_gae_matches_numpy_with_mid_trajectory_dones():
    """GAE(gamma, lambda) against a float64 loop, with episode ends mid-trajectory.

    Catches: lambda ignored or forced to 0 (one-step TD advantages), bootstrapping through a done,
    a missing last_value bootstrap. Called as ``G.gae`` (module attribute, as the RL loop reaches it) so
    ``mutate.py teams_rl_jax.rl.gae:gae`` reaches this test too.
    """
    rng = seeded_rng(0)
    T, N, gamma, lam = 9, 5, 0.995, 0.97
    rewards = rng.normal(size=(T, N)).astype(np.float32)
    values = rng.normal(size=(T, N)).astype(np.float32)
    dones = rng.random((T, N)) < 0.25
    dones[3, 0] = dones[5, 1] = True  # certainly some episode boundaries mid-trajectory
    dones[:, 2] = False  # and one column without any (bootstraps from last_value)
    last_value = rng.normal(size=(N,)).astype(np.float32)

    adv, targets = G.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(dones), jnp.asarray(last_value),
                         gamma, lam)
    ref = _np_gae(rewards.astype(np.float64), values.astype(np.float64), dones.astype(np.float64), last_value,
                  gamma, lam)
    np.testing.assert_allclose(adv, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(targets, ref + values, rtol=1e-5, atol=1e-5)
    # lambda matters here: the one-step TD advantages (lambda = 0) are far from the reference.
    td = _np_gae(rewards.astype(np.float64), values.astype(np.float64), dones.astype(np.float64), last_value, gamma,
                 0.0)
    assert np.max(np.abs(td - ref)) > 0.5

    # lambda = 1 with zero values is the discounted return.
    ret = G.discounted_returns(jnp.asarray(rewards), jnp.asarray(dones), jnp.asarray(last_value), gamma)
    ref_ret = _np_gae(rewards, np.zeros_like(values), dones.astype(np.float64), last_value, gamma, 1.0)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)


def test_normalize_ignores_masked_entries():
    x = jnp.asarray([1.0, 2.0, 3.0, 100.0])
    w = jnp.asarray([1.0, 1.0, 1.0, 0.0])
    out = np.asarray(normalize(x, w))
    np.testing.assert_allclose(out[:3], (np.array([1, 2, 3]) - 2) / np.std([1, 2, 3]), rtol=1e-5)
    assert out[3] == 0.0


def test_conjugate_gradient_solves_random_spd():
    """Catches: CG returning b (or any non-solve), a missing residual-tolerance stop (0/0 -> NaN)."""
    rng = seeded_rng(1)
    n = 8
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = (q * rng.uniform(1.0, 4.0, size=n)) @ q.T
    b = rng.normal(size=n)
    x = jax.jit(lambda b: TR.conjugate_gradient(lambda v: jnp.asarray(a, jnp.float32) @ v, b, iters=10))(
        jnp.asarray(b, jnp.float32)
    )
    np.testing.assert_allclose(x, np.linalg.solve(a, b), rtol=1e-4, atol=1e-4)
    assert np.all(np.isfinite(x))  # iterations past convergence stay finite (residual-tol stop)


def _tiny_policy(key, obs_dim=5, num_actions=6):
    net = P.ActorCritic(num_actions=num_actions, hidden_sizes=(8,))
    params = net.init(key, jnp.zeros((obs_dim,)))
    # Scale up the actor's output layer so the initial policy is far from uniform (a stricter test).
    out = params["params"]["actor"]["out"]
    params["params"]["actor"]["out"] = {"kernel": out["kernel"] * 100.0, "bias": out["bias"]}
    return net, params


def test_fisher_vector_product_equals_kl_hessian():
    """Catches: a Fisher-vector product that drops the p p^T term, the weights, or the damping."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(2), 3)
    net, params = _tiny_policy(k1)
    obs = jax.random.normal(k2, (7, 5))
    weights = jnp.asarray([1, 1, 1, 0, 1, 1, 0], jnp.float32)
    mask = jnp.ones((7, 6), bool).at[1, 2].set(False)
    inner = params["params"]
    flat0, unravel = ravel_pytree(inner["actor"])

    def logits_fn(flat):
        return net.apply({"params": {**inner, "actor": unravel(flat)}}, obs, mask, method="logits")

    old = jax.lax.stop_gradient(logits_fn(flat0))

    def mean_kl(flat):
        kl = P.kl_divergence(old, logits_fn(flat))
        return jnp.sum(kl * weights) / jnp.sum(weights)

    v = jax.random.normal(k3, flat0.shape)
    hess = jax.jit(jax.hessian(mean_kl), compiler_options=FAST)(flat0)  # explicit matrix only as the test's reference
    fvp = jax.jit(lambda v: TR.fisher_vector_product(logits_fn, flat0, weights, damping=0.1)(v), compiler_options=FAST)
    np.testing.assert_allclose(fvp(v), hess @ v + 0.1 * v, rtol=2e-3, atol=2e-4)


def test_trpo_update_respects_kl_bound_and_improves_surrogate():
    """The actor step goes along the natural gradient (F + damping I)^-1 g, solved densely here.

    Catches: ``conjugate_gradient`` returning ``b`` (the plain gradient; the line search alone still
    keeps the KL bound and a surrogate gain, so only the direction tells), a wrong Fisher-vector product,
    a step not scaled to the quadratic KL radius ``max_kl``, a critic fit that does not fit.
    """
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(3), 4)
    # Small actor (102 params) so the test can form the Fisher matrix; output layer scaled up (far from
    # uniform) so the Fisher is far from isotropic and the natural gradient far from the plain one.
    net, params = _tiny_policy(k1, obs_dim=5, num_actions=6)
    n = 64
    obs = jax.random.normal(k2, (n, 5))
    logits, values = net.apply(params, obs)
    actions = P.sample(k3, logits)
    adv = normalize(jax.random.normal(k4, (n,)) + (actions == 2), jnp.ones((n,)))
    targets = 3.0 * obs[:, 0] + 1.0
    weights = jnp.ones((n,)).at[-5:].set(0.0)
    batch = Batch(obs=obs, actions=actions, advantages=adv, targets=targets, weights=weights,
                  old_logits=logits, old_values=values, action_mask=None)
    # damping 0.01 (not the default 0.1): with 0.1 the damping term dominates this tiny Fisher, so the
    # natural and plain gradients are nearly parallel (cosine 0.89) and the direction test has no margin.
    cfg = TRPOConfig(damping=0.01)
    new_params, m = jax.jit(lambda p, b: trpo_update(net, p, b, cfg), compiler_options=FAST)(params, batch)

    inner = params["params"]
    flat0, unravel = ravel_pytree(inner["actor"])
    flat1, _ = ravel_pytree(new_params["params"]["actor"])

    def logits_fn(flat):
        return net.apply({"params": {**inner, "actor": unravel(flat)}}, obs, method="logits")

    def mean_kl(flat):
        return jnp.sum(P.kl_divergence(logits, logits_fn(flat)) * weights) / jnp.sum(weights)

    def surrogate(flat):
        ratio = jnp.exp(P.log_prob(logits_fn(flat), actions) - P.log_prob(logits, actions))
        return jnp.sum(ratio * adv * weights) / jnp.sum(weights)

    # Dense reference: Fisher = Hessian of the mean KL at the old params, natural gradient by solve.
    fisher = jax.jit(jax.hessian(mean_kl), compiler_options=FAST)(flat0)
    a = np.asarray(fisher, np.float64) + cfg.damping * np.eye(flat0.size)
    g = np.asarray(jax.grad(surrogate)(flat0), np.float64)
    natural = np.linalg.solve(a, g)
    step = np.asarray(flat1 - flat0, np.float64)
    cos = lambda u, v: float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))  # noqa: E731
    assert float(m["linesearch_accepted"]) == 1.0 and float(m["step_fraction"]) > 0
    # The margin that makes the check mean something: the plain gradient is far from the natural one.
    assert cos(g, natural) < 0.7, f"test set-up lost its margin: cos(g, natural) = {cos(g, natural):.3f}"
    assert cos(step, natural) > 0.99, (cos(step, natural), cos(step, g))
    # The full step (before the line search's fraction) sits on the quadratic KL model's radius max_kl.
    full = step / float(m["step_fraction"])
    np.testing.assert_allclose(0.5 * full @ a @ full, cfg.max_kl, rtol=1e-3)

    kl = float(mean_kl(flat1))
    assert 0.0 < kl <= 1.5 * cfg.max_kl
    assert float(surrogate(flat1)) > float(surrogate(flat0)) + 1e-3
    np.testing.assert_allclose(float(m["kl"]), kl, rtol=1e-3, atol=1e-6)

    def vloss(p):
        v = net.apply(p, obs, method="value")
        return float(jnp.sum(jnp.square(v - targets) * weights) / jnp.sum(weights))

    assert vloss(new_params) < 0.5 * vloss(params)  # the L-BFGS critic fit made progress


def test_ppo_clipping_exact_at_boundaries():
    eps = 0.2
    lo, hi = jnp.float32(1.0 - eps), jnp.float32(1.0 + eps)
    for a in (2.0, -3.0):
        adv = jnp.float32(a)
        # At the boundaries both terms coincide: the objective is exactly (1 +- eps) * A.
        assert clipped_surrogate(hi, adv, eps) == hi * adv
        assert clipped_surrogate(lo, adv, eps) == lo * adv
        assert clipped_surrogate(jnp.float32(1.0), adv, eps) == adv

    grad = jax.grad(clipped_surrogate)
    # Beyond the region on the side the advantage pushes towards: zero gradient.
    assert grad(jnp.float32(1.5), jnp.float32(2.0), eps) == 0.0
    assert grad(jnp.float32(0.5), jnp.float32(-3.0), eps) == 0.0
    # Inside, or on the pessimistic side: the unclipped gradient A.
    assert grad(jnp.float32(1.1), jnp.float32(2.0), eps) == 2.0
    assert grad(jnp.float32(0.5), jnp.float32(2.0), eps) == 2.0
    assert grad(jnp.float32(1.5), jnp.float32(-3.0), eps) == -3.0
    # Value is clipped (not the raw ratio) beyond the region.
    assert clipped_surrogate(jnp.float32(1.5), jnp.float32(2.0), eps) == hi * 2.0


def test_paper_schedule_and_overrides():
    assert B.paper_schedule(6) == (
        "add_constraints", "breadth", "add_constraints", "add_constraints", "breadth", "add_constraints",
    )
    assert list(B.schedule_table(("paper",), 6)) == [0, 5, 0, 0, 5, 0]
    assert list(B.schedule_table(("deepening", "breadth"), 4)) == [1, 5, 5, 5]
    assert list(B.schedule_table(("round_robin",), 7)) == [0, 1, 2, 3, 4, 5, 0]
    # The generator's overrides on arbitrary policy actions: breadth at t=1,4; breadth -> add_constraints elsewhere.
    acts = jnp.asarray([5, 2, 5, 3, 1, 5])
    out = jax.vmap(B.paper_overrides)(jnp.arange(6), acts)
    assert list(np.asarray(out)) == [0, 5, 0, 3, 5, 0]


def test_fixed_action_falls_back_when_masked():
    mask = jnp.ones((3, 6), bool).at[1, 5].set(False)
    a = B.fixed_action(jnp.asarray([0, 5, 0]), jnp.int32(1), jax.random.PRNGKey(0), mask)
    assert int(a[0]) == 5 and int(a[2]) == 5 and int(a[1]) != 5


def test_masked_policy_never_picks_masked_ops():
    net = P.ActorCritic(num_actions=6, hidden_sizes=(8,))
    params = net.init(jax.random.PRNGKey(0), jnp.zeros((4,)))
    obs = jax.random.normal(jax.random.PRNGKey(1), (256, 4))
    mask = jnp.ones((256, 6), bool).at[:, 3].set(False)
    logits = net.apply(params, obs, mask, method="logits")
    acts = P.sample(jax.random.PRNGKey(2), logits)
    assert not np.any(np.asarray(acts) == 3)
    assert np.all(np.isfinite(P.entropy(logits))) and np.all(np.isfinite(P.kl_divergence(logits, logits)))
    np.testing.assert_allclose(P.kl_divergence(logits, logits), 0.0, atol=1e-6)


def test_policy_config_loads_and_validates():
    cfg = cfglib.from_dict(PolicyConfig, {"algo": "ppo", "num_envs": 8, "trpo": {"max_kl": 0.02},
                                          "queries": {"budget": 5, "roles": ["reviewer"]}})
    assert cfg.trpo.max_kl == 0.02 and cfg.trpo.damping == 0.1 and cfg.queries.enabled
    assert PolicyConfig().gamma == 0.995 and PolicyConfig().gae_lambda == 0.97
    bad = [
        {"algo": "sac"},
        {"num_envs": 0},
        {"gamma": 1.5},
        {"trpo": {"max_kl": 0}},
        {"algo": "ppo", "num_envs": 3, "num_steps": 3, "ppo": {"num_minibatches": 4}},
        {"disabled_ops": ["teleport"]},
        {"schedule": ["paper", "nonsense"]},
        {"compare": ["best"]},
        {"queries": {"budget": -1}},
        {"host_rollout": "step"},
    ]
    for data in bad:
        with pytest.raises(ConfigError):
            cfglib.from_dict(PolicyConfig, data)
