"""Generalised advantage estimation, discounted returns and masked statistics (time-major ``[T, N]``).

``dones[t]`` is True when the episode ended *at* step ``t`` (after its action): no bootstrapping
through it. An episode that hits the horizon is treated as finished (the step fraction is part of the
observation, so the horizon is part of the state), as in the TeaMs-RL reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gae(
    rewards: jax.Array,
    values: jax.Array,
    dones: jax.Array,
    last_value: jax.Array,
    gamma: float,
    lam: float,
) -> tuple[jax.Array, jax.Array]:
    """GAE(gamma, lambda) advantages and value targets (``advantages + values``).

    Args:
      rewards, values, dones: ``[T, N]`` (dones bool or 0/1).
      last_value: ``[N]`` value of the observation after the last step (used where not done).
    Returns:
      ``(advantages [T, N], targets [T, N])``.
    """
    not_done = 1.0 - dones.astype(jnp.float32)

    def step(carry, xs):
        next_adv, next_value = carry
        r, v, nd = xs
        delta = r + gamma * next_value * nd - v
        adv = delta + gamma * lam * nd * next_adv
        return (adv, v), adv

    init = (jnp.zeros_like(last_value), last_value)
    _, adv = jax.lax.scan(step, init, (rewards, values, not_done), reverse=True)
    return adv, adv + values


def discounted_returns(rewards: jax.Array, dones: jax.Array, last_value: jax.Array, gamma: float) -> jax.Array:
    """Discounted reward-to-go ``[T, N]`` (bootstrapped with ``last_value`` where the rollout was cut).

    The reference fits its TRPO critic to these Monte-Carlo returns rather than to GAE targets.
    """
    not_done = 1.0 - dones.astype(jnp.float32)

    def step(next_ret, xs):
        r, nd = xs
        ret = r + gamma * nd * next_ret
        return ret, ret

    _, ret = jax.lax.scan(step, last_value, (rewards, not_done), reverse=True)
    return ret


def masked_mean(x: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean of ``x`` over entries with weight 1 (weights 0/1, broadcastable); 0 when all are masked."""
    w = jnp.broadcast_to(weights, x.shape).astype(x.dtype)
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def normalize(x: jax.Array, weights: jax.Array, eps: float = 1e-8) -> jax.Array:
    """``(x - mean) / (std + eps)`` using only the entries with weight 1 (others returned as 0)."""
    mean = masked_mean(x, weights)
    var = masked_mean(jnp.square(x - mean), weights)
    return jnp.where(weights > 0, (x - mean) / (jnp.sqrt(var) + eps), 0.0)
