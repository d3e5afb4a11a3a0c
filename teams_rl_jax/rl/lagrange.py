"""Lagrange multiplier for the query budget: ``max_pi min_{lambda>=0} J_r - lambda (J_q - budget)``.

The multiplier is a scalar trained by an Optax optimiser on ``-lambda * (J_q - budget)`` (so it grows
while expected queries per episode exceed the budget and shrinks otherwise), projected onto
``lambda >= 0`` after every step. The policy sees the penalised reward ``r - lambda * q`` per step.
"""

from __future__ import annotations

from typing import Any

import flax.struct as struct
import jax
import jax.numpy as jnp
import optax

from teams_rl_jax.errors import ConfigError
from teams_rl_jax.rl.config import QueryBudgetConfig


@struct.dataclass
class LagrangeState:
    """Current multiplier (float32 scalar) and its optimiser state."""

    multiplier: jax.Array
    opt_state: Any


def make_lagrange(cfg: QueryBudgetConfig) -> tuple[optax.GradientTransformation, LagrangeState]:
    """The multiplier's optimiser (Adam, ``cfg.lr``) and initial state (``cfg.init``)."""
    tx = optax.adam(cfg.lr)
    lam = jnp.asarray(cfg.init, jnp.float32)
    return tx, LagrangeState(multiplier=lam, opt_state=tx.init(lam))


def lagrange_step(
    tx: optax.GradientTransformation, state: LagrangeState, mean_queries: jax.Array, budget: float
) -> LagrangeState:
    """One multiplier step from the measured mean queries per episode; stays ``>= 0``."""
    # d/dlambda of -lambda * (J_q - budget); descending it raises lambda when over budget.
    grad = -(jnp.asarray(mean_queries, jnp.float32) - budget)
    updates, opt_state = tx.update(grad, state.opt_state, state.multiplier)
    lam = jnp.maximum(optax.apply_updates(state.multiplier, updates), 0.0)
    return LagrangeState(multiplier=lam, opt_state=opt_state)


def query_cost(queries: dict[str, jax.Array], roles: tuple[str, ...] = ()) -> jax.Array:
    """Sum of the per-step query counts over ``roles`` (all roles when empty)."""
    names = roles or tuple(sorted(queries))
    missing = [r for r in names if r not in queries]
    if missing:
        raise ConfigError(f"queries.roles: {missing[0]!r} is not a role in the env's info['queries'] (has: {sorted(queries)})")
    return sum(jnp.asarray(queries[r], jnp.float32) for r in names)
