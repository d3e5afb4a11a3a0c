"""What an algorithm is to ``make_train``: how to initialise, act and learn (one small file each).

``trpo.make_trpo``, ``ppo.make_ppo`` and ``baselines.make_random`` / ``make_fixed`` return an
:class:`Algorithm`; ``train.make_train`` pairs it with the shared rollout. :func:`actor_critic_batch`
is the part TRPO and PPO share: the query-penalised reward, GAE, the critic's targets and the flat
batch.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.struct as struct
import jax
import jax.numpy as jnp

from teams_rl_jax.models.policy import ActorCritic
from teams_rl_jax.rl.config import PolicyConfig
from teams_rl_jax.rl.gae import discounted_returns, gae, normalize
from teams_rl_jax.rl.lagrange import query_cost
from teams_rl_jax.rl.rollout import RolloutCarry, Transition


@struct.dataclass
class Batch:
    """Flat training batch ``[B, ...]`` for a policy update (invalid rows have ``weights == 0``)."""

    obs: jax.Array
    actions: jax.Array
    advantages: jax.Array
    targets: jax.Array
    weights: jax.Array
    old_logits: jax.Array
    old_values: jax.Array
    action_mask: jax.Array | None = None


class Algorithm(NamedTuple):
    """``init(key, obs_dim) -> (params, opt_state)``;
    ``act(params, key, obs [N, D], t, mask [N, A]) -> (action [N], logits [N, A], value [N])``;
    ``learn(params, opt_state, traj [T, N], last, multiplier, key) -> (params, opt_state, metrics)``
    (``multiplier``: the query-budget Lagrange multiplier, 0 when unconstrained)."""

    init: Callable[[jax.Array, int], tuple[Any, Any]]
    act: Callable[..., tuple[jax.Array, jax.Array, jax.Array]]
    learn: Callable[..., tuple[Any, Any, dict]]


def make_network(config: PolicyConfig, num_actions: int) -> ActorCritic:
    """The actor-critic described by ``config`` (hidden sizes, activation)."""
    return ActorCritic(num_actions=num_actions, hidden_sizes=tuple(config.hidden_sizes), activation=config.activation)


def init_params(network: ActorCritic, key: jax.Array, obs_dim: int) -> Any:
    """Initial network params for observations of size ``obs_dim``."""
    return network.init(key, jnp.zeros((obs_dim,), jnp.float32))


def actor_critic_batch(config: PolicyConfig, network: ActorCritic, params: Any, traj: Transition,
                       last: RolloutCarry, multiplier: jax.Array, returns_targets: bool) -> Batch:
    """The flat ``[T * N]`` training batch of an episode-aligned rollout.

    The reward is ``r - multiplier * queries`` under a query budget. Steps after an episode ended are
    terminal too, so nothing leaks across the boundary. ``returns_targets``: regress the critic on
    discounted returns (the TeaMs-RL reference's TRPO) instead of GAE targets (PPO).
    """
    T, N = traj.reward.shape
    reward = traj.reward
    if config.queries.enabled:
        reward = reward - multiplier * query_cost(traj.queries, tuple(config.queries.roles))
    done = traj.done | (traj.valid == 0)
    last_value = network.apply(params, last.obs, method="value") * last.alive
    adv, targets = gae(reward, traj.value, done, last_value, config.gamma, config.gae_lambda)
    if returns_targets:
        targets = discounted_returns(reward, done, last_value, config.gamma)
    if config.normalize_advantages:
        adv = normalize(adv, traj.valid)
    flat = lambda x: x.reshape((T * N,) + x.shape[2:])  # noqa: E731
    return Batch(obs=flat(traj.obs), actions=flat(traj.action), advantages=flat(adv), targets=flat(targets),
                 weights=flat(traj.valid), old_logits=flat(traj.logits), old_values=flat(traj.value),
                 action_mask=flat(traj.action_mask))
