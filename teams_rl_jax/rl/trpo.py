"""TRPO as in the TeaMs-RL reference, in pure JAX.

One update = (1) fit the critic to discounted returns with L-BFGS (``optax.lbfgs``, 25 iterations,
L2 penalty on all critic weights), (2) a natural-gradient policy step: conjugate gradient on
Fisher-vector products (computed with jvp/vjp through the logits, never forming a matrix), step
scaled to the KL radius ``max_kl``, then a backtracking line search (halvings, accept ratio 0.1) that
also rejects steps whose mean KL exceeds ``kl_bound_factor * max_kl``.

Vectors for CG are flat (``jax.flatten_util.ravel_pytree`` of the actor params).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.struct as struct
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from teams_rl_jax.models import policy as P
from teams_rl_jax.rl.algorithm import Algorithm, Batch, actor_critic_batch, init_params
from teams_rl_jax.rl.config import TRPOConfig
from teams_rl_jax.rl.gae import masked_mean


def conjugate_gradient(
    matvec: Callable[[jax.Array], jax.Array], b: jax.Array, iters: int, residual_tol: float = 1e-10
) -> jax.Array:
    """Approximately solve ``A x = b`` for SPD ``A`` given only ``matvec(v) = A v`` (``iters`` steps).

    Stops updating once ``|r|^2 < residual_tol`` (the reference's early break), which also avoids
    0/0 when the system is solved exactly before the last iteration.
    """

    def body(_, carry):
        x, r, p, rdotr = carry
        active = rdotr >= residual_tol
        ap = matvec(p)
        pap = jnp.vdot(p, ap)
        alpha = jnp.where(active, rdotr / jnp.where(pap == 0, 1.0, pap), 0.0)
        x = x + alpha * p
        r = r - alpha * ap
        new_rdotr = jnp.vdot(r, r)
        beta = new_rdotr / jnp.where(rdotr == 0, 1.0, rdotr)
        p = jnp.where(active, r + beta * p, p)
        rdotr = jnp.where(active, new_rdotr, rdotr)
        return x, r, p, rdotr

    init = (jnp.zeros_like(b), b, b, jnp.vdot(b, b))
    x, *_ = jax.lax.fori_loop(0, iters, body, init)
    return x


def fisher_vector_product(
    logits_fn: Callable[[jax.Array], jax.Array], flat_params: jax.Array, weights: jax.Array, damping: float
) -> Callable[[jax.Array], jax.Array]:
    """Return ``v -> (F + damping I) v`` for the mean-KL Hessian at ``flat_params``.

    For a categorical policy, the Hessian of ``mean_s KL(pi_old(.|s) || pi(.|s))`` at ``pi = pi_old``
    is ``J^T M J / B`` with ``J`` the logits' Jacobian and ``M = diag(p) - p p^T`` per row: one jvp,
    a cheap per-row product and one vjp. The forward pass is linearised once and reused by every CG
    iteration.
    """
    logits, jvp_fn = jax.linearize(logits_fn, flat_params)
    _, vjp_fn = jax.vjp(logits_fn, flat_params)
    probs = jax.nn.softmax(logits, axis=-1)
    w = weights / jnp.maximum(jnp.sum(weights), 1.0)

    def fvp(v):
        jv = jvp_fn(v)
        mjv = probs * jv - probs * jnp.sum(probs * jv, axis=-1, keepdims=True)
        (out,) = vjp_fn(mjv * w[:, None])
        return out + damping * v

    return fvp


@struct.dataclass
class LineSearchResult:
    """Outcome of the backtracking line search."""

    params: jax.Array
    accepted: jax.Array
    step_fraction: jax.Array
    loss: jax.Array
    kl: jax.Array


def line_search(
    eval_fn: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
    x: jax.Array,
    fullstep: jax.Array,
    expected_improve_rate: jax.Array,
    max_backtracks: int = 10,
    accept_ratio: float = 0.1,
    max_kl: float = jnp.inf,
) -> LineSearchResult:
    """Backtracking line search over step fractions ``0.5 ** k``, ``k < max_backtracks``.

    ``eval_fn(x) -> (loss, mean_kl)``. Accepts the first (largest) step with positive improvement,
    improvement / expected improvement above ``accept_ratio`` and mean KL at most ``max_kl``; returns
    ``x`` unchanged if none qualifies. All candidates are evaluated at once (vmap): the same result
    as the sequential loop, in one fused pass.
    """
    loss0, _ = eval_fn(x)
    fracs = 0.5 ** jnp.arange(max_backtracks, dtype=x.dtype)
    cands = x[None, :] + fracs[:, None] * fullstep[None, :]
    losses, kls = jax.vmap(eval_fn)(cands)
    actual = loss0 - losses
    expected = expected_improve_rate * fracs
    ok = (actual / expected > accept_ratio) & (actual > 0) & (kls <= max_kl) & jnp.isfinite(losses)
    accepted = jnp.any(ok)
    k = jnp.argmax(ok)
    return LineSearchResult(
        params=jnp.where(accepted, cands[k], x),
        accepted=accepted,
        step_fraction=jnp.where(accepted, fracs[k], 0.0),
        loss=jnp.where(accepted, losses[k], loss0),
        kl=jnp.where(accepted, kls[k], 0.0),
    )


class _NoState(NamedTuple):
    """Stateless line search."""


def static_backtracking_linesearch(
    num_steps: int = 12, decrease_factor: float = 0.5, slope_rtol: float = 1e-4
) -> optax.GradientTransformationExtraArgs:
    """Armijo backtracking over a fixed set of step sizes ``decrease_factor ** k``, ``k < num_steps``.

    A drop-in ``linesearch`` for ``optax.lbfgs`` with no data-dependent ``while_loop``: all candidate
    steps are evaluated at once (vmap) and the largest one with sufficient decrease is taken (0 if
    none). Optax's own zoom / backtracking searches loop with ``lax.while_loop``, and those loops,
    batched by ``jax.vmap`` over seeds, were seen to hang the XLA CPU runtime (jax 0.10); this one
    keeps ``jit(vmap(train))`` safe and compiles faster. ``update`` needs ``value``, ``grad`` and
    ``value_fn`` keyword arguments, like optax's searches.
    """

    def init_fn(params):
        del params
        return _NoState()

    def update_fn(updates, state, params, *, value, grad, value_fn, **extra_args):
        del extra_args
        fracs = decrease_factor ** jnp.arange(num_steps, dtype=jnp.float32)
        slope = optax.tree.vdot(updates, grad)  # directional derivative along the L-BFGS direction

        def value_at(frac):
            return value_fn(jax.tree_util.tree_map(lambda p, u: p + frac * u, params, updates))

        values = jax.vmap(value_at)(fracs)
        ok = (values <= value + slope_rtol * fracs * slope) & jnp.isfinite(values)
        step = jnp.where(jnp.any(ok), fracs[jnp.argmax(ok)], 0.0)
        return jax.tree_util.tree_map(lambda u: step * u, updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def fit_value_lbfgs(
    value_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    obs: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    iters: int = 25,
    l2: float = 1e-3,
    memory: int = 10,
    linesearch: str = "backtracking",
) -> tuple[Any, jax.Array]:
    """Fit critic ``params`` by L-BFGS to ``targets`` (masked MSE + ``l2 * sum(params**2)``).

    Mirrors the reference's ``scipy.optimize.fmin_l_bfgs_b(..., maxiter=25)`` with ``optax.lbfgs``.
    ``linesearch="backtracking"`` uses :func:`static_backtracking_linesearch` (vmap-safe);
    ``"zoom"`` uses optax's default zoom line search (closer to scipy's, but see the caveat there).
    Returns ``(params, final_loss)``.
    """

    def loss_fn(p):
        mse = masked_mean(jnp.square(value_fn(p, obs) - targets), weights)
        reg = sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree_util.tree_leaves(p))
        return mse + l2 * reg

    if linesearch == "zoom":
        solver = optax.lbfgs(memory_size=memory)
        value_and_grad = optax.value_and_grad_from_state(loss_fn)  # reuses the search's last value/grad
    else:
        solver = optax.lbfgs(memory_size=memory, linesearch=static_backtracking_linesearch())
        plain = jax.value_and_grad(loss_fn)
        value_and_grad = lambda p, state: plain(p)  # noqa: E731

    def body(_, carry):
        p, state = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = solver.update(grad, state, p, value=value, grad=grad, value_fn=loss_fn)
        return optax.apply_updates(p, updates), state

    params, _ = jax.lax.fori_loop(0, iters, body, (params, solver.init(params)))
    return params, loss_fn(params)


def trpo_update(network, params: Any, batch: Batch, cfg: TRPOConfig) -> tuple[Any, dict[str, jax.Array]]:
    """One TRPO update of an :class:`~teams_rl_jax.models.policy.ActorCritic`'s ``params``.

    ``batch.advantages`` should already be normalised; ``batch.targets`` are the critic's regression
    targets. Returns new params and metrics (surrogate loss before the step, value loss after the
    fit, KL, entropy of the new policy, whether the line search accepted and the step fraction).
    """
    inner = params["params"]
    w = batch.weights

    # (1) Critic: L-BFGS on its own subtree.
    def value_fn(critic, obs):
        return network.apply({"params": {**inner, "critic": critic}}, obs, method="value")

    critic, value_loss = fit_value_lbfgs(
        value_fn, inner["critic"], batch.obs, batch.targets, w,
        cfg.value_iters, cfg.value_l2, cfg.value_memory, cfg.value_linesearch,
    )

    # (2) Actor: natural-gradient step on the flat actor params.
    flat0, unravel = ravel_pytree(inner["actor"])

    def logits_fn(flat):
        return network.apply(
            {"params": {**inner, "actor": unravel(flat)}}, batch.obs, batch.action_mask, method="logits"
        )

    old_logits = jax.lax.stop_gradient(batch.old_logits)
    old_logp = P.log_prob(old_logits, batch.actions)

    def surrogate_from_logits(logits):
        ratio = jnp.exp(P.log_prob(logits, batch.actions) - old_logp)
        return -masked_mean(ratio * batch.advantages, w)

    def surrogate_loss(flat):
        return surrogate_from_logits(logits_fn(flat))

    def loss_and_kl(flat):
        logits = logits_fn(flat)
        return surrogate_from_logits(logits), masked_mean(P.kl_divergence(old_logits, logits), w)

    loss0, grad = jax.value_and_grad(surrogate_loss)(flat0)
    fvp = fisher_vector_product(logits_fn, flat0, w, cfg.damping)
    stepdir = conjugate_gradient(fvp, -grad, cfg.cg_iters, cfg.cg_residual_tol)
    shs = 0.5 * jnp.vdot(stepdir, fvp(stepdir))
    # Scale so that the quadratic KL model equals max_kl; guard a zero gradient (shs == 0).
    lagrange = jnp.sqrt(jnp.maximum(shs, 1e-20) / cfg.max_kl)
    fullstep = stepdir / lagrange
    expected_rate = -jnp.vdot(grad, stepdir) / lagrange
    ls = line_search(
        loss_and_kl, flat0, fullstep, expected_rate,
        cfg.max_backtracks, cfg.accept_ratio, cfg.kl_bound_factor * cfg.max_kl,
    )
    new_params = {"params": {**inner, "actor": unravel(ls.params), "critic": critic}}
    new_logits = logits_fn(ls.params)
    metrics = {
        "policy_loss": loss0,
        "value_loss": value_loss,
        "kl": masked_mean(P.kl_divergence(old_logits, new_logits), w),
        "entropy": masked_mean(P.entropy(new_logits), w),
        "linesearch_accepted": ls.accepted.astype(jnp.float32),
        "step_fraction": ls.step_fraction,
        "surrogate_improvement": loss0 - ls.loss,
    }
    return new_params, metrics


def make_trpo(config, network):
    """TRPO as an :class:`~teams_rl_jax.rl.algorithm.Algorithm`: sample from the policy, one
    :func:`trpo_update` per rollout (critic on discounted returns, as the reference)."""
    def init(key, obs_dim):
        return init_params(network, key, obs_dim), ()

    def act(params, key, obs, t, mask):
        logits, value = network.apply(params, obs, mask)
        return P.sample(key, logits), logits, value

    def learn(params, opt_state, traj, last, multiplier, key):
        batch = actor_critic_batch(config, network, params, traj, last, multiplier, returns_targets=True)
        params, metrics = trpo_update(network, params, batch, config.trpo)
        return params, opt_state, metrics

    return Algorithm(init, act, learn)
