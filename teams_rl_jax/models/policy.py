"""Actor-critic network for the policy stage, plus the masked categorical it parameterises.

The observation is the env's float32 vector (instruction embedding, one-hot previous operation, step
fraction); the actor outputs logits over the six Evol-Instruct operations and the critic a scalar
value. Actor and critic are separate MLPs (as in the TeaMs-RL reference, whose TRPO steps the policy
and fits the value net by L-BFGS independently), so each can be updated on its own param subtree:
``params["actor"]`` / ``params["critic"]``.

Action masks are boolean ``[..., num_actions]`` (True = allowed). Masked logits are set to a large
finite negative number rather than ``-inf`` so that log-probs, entropies and KLs stay finite (0 * big
= 0) and gradients through masked entries are exactly zero.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.initializers import constant, orthogonal

# Finite stand-in for -inf on masked logits (see module docstring).
MASKED_LOGIT = -1e9


def _activation(name: str):
    if name == "tanh":
        return nn.tanh
    if name == "relu":
        return nn.relu
    raise ValueError(f"unknown activation {name!r} (expected 'tanh' or 'relu')")


class MLP(nn.Module):
    """Dense stack with orthogonal init; the last layer's scale sets the initial output size."""

    hidden_sizes: Sequence[int]
    out_dim: int
    activation: str = "tanh"
    out_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = _activation(self.activation)
        for i, width in enumerate(self.hidden_sizes):
            x = nn.Dense(width, kernel_init=orthogonal(np.sqrt(2)), bias_init=constant(0.0), name=f"dense_{i}")(x)
            x = act(x)
        return nn.Dense(self.out_dim, kernel_init=orthogonal(self.out_scale), bias_init=constant(0.0), name="out")(x)


class ActorCritic(nn.Module):
    """Separate actor (logits over ``num_actions``) and critic (scalar value) MLPs.

    ``__call__(obs, mask=None) -> (logits [..., A], value [...])``; ``logits(obs, mask)`` and
    ``value(obs)`` run one head only (use ``apply(..., method="logits")``). The actor's last layer is
    initialised with scale 0.01 so the initial policy is close to uniform.
    """

    num_actions: int
    hidden_sizes: Sequence[int] = (64, 64)
    activation: str = "tanh"

    def setup(self):
        self.actor = MLP(self.hidden_sizes, self.num_actions, self.activation, out_scale=0.01)
        self.critic = MLP(self.hidden_sizes, 1, self.activation, out_scale=1.0)

    def logits(self, obs: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Masked action logits ``float32 [..., num_actions]``."""
        return masked_logits(self.actor(obs.astype(jnp.float32)), mask)

    def value(self, obs: jax.Array) -> jax.Array:
        """State value ``float32 [...]``."""
        return self.critic(obs.astype(jnp.float32))[..., 0]

    def __call__(self, obs: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        return self.logits(obs, mask), self.value(obs)


def masked_logits(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Replace disallowed actions' logits (``mask`` False) by :data:`MASKED_LOGIT`; ``None`` = all allowed."""
    if mask is None:
        return logits
    return jnp.where(mask, logits, MASKED_LOGIT)


def log_probs(logits: jax.Array) -> jax.Array:
    """Normalised log-probabilities of a categorical given (masked) logits."""
    return jax.nn.log_softmax(logits, axis=-1)


def log_prob(logits: jax.Array, actions: jax.Array) -> jax.Array:
    """``log pi(action)`` for integer ``actions [...]`` under ``logits [..., A]``."""
    lp = log_probs(logits)
    return jnp.take_along_axis(lp, actions[..., None].astype(jnp.int32), axis=-1)[..., 0]


def entropy(logits: jax.Array) -> jax.Array:
    """Categorical entropy ``[...]`` (masked actions contribute exactly 0)."""
    lp = log_probs(logits)
    return -jnp.sum(jnp.exp(lp) * lp, axis=-1)


def kl_divergence(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
    """``KL(p || q)`` per row for two categoricals given by logits (same mask on both)."""
    lp, lq = log_probs(logits_p), log_probs(logits_q)
    return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


def sample(key: jax.Array, logits: jax.Array) -> jax.Array:
    """Sample int32 actions ``[...]`` from ``logits [..., A]``."""
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
