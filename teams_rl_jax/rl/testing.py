"""A small synthetic env with the real env's API, for testing the RL algorithms fast on CPU.

Six actions, ``horizon`` steps. The reward at step ``t`` is 1 when the action is ``optimal[t]`` *and*
the previous action was ``optimal[t-1]`` (no condition at ``t = 0``), else 0. So one operation
sequence is optimal (return ``horizon``), a uniformly random policy earns ``1/6 + (H-1)/36``, and a
policy that ignores the observation (step fraction, previous action) cannot do well. The observation
mirrors the real one: a per-episode "instruction embedding" (noise the policy must ignore), the
one-hot previous action and the step fraction. Each step costs one ``instructor`` query and
``query_costs[action]`` ``reviewer`` queries; ``terminate_action`` (if >= 0) ends the episode early;
``allowed`` feeds the ``action_mask`` hook.
"""

from __future__ import annotations

import flax.struct as struct
import jax
import jax.numpy as jnp

from teams_rl_jax.env.factory import register_env

NUM_ACTIONS = 6
DEFAULT_OPTIMAL = (2, 5, 0, 3, 1, 4)


@struct.dataclass
class SyntheticParams:
    """Env parameters (a pytree; ``horizon``, ``embed_dim``, ``terminate_action`` are static)."""

    optimal: jax.Array
    query_costs: jax.Array
    allowed: jax.Array
    pool: jax.Array | None = None  # default reset embeddings [S, embed_dim] (None: N(0, 1) draws)
    horizon: int = struct.field(pytree_node=False, default=6)
    embed_dim: int = struct.field(pytree_node=False, default=8)
    terminate_action: int = struct.field(pytree_node=False, default=-1)


@struct.dataclass
class SyntheticState:
    """Per-env state: step index, previous action (-1 before the first), embedding, done flag."""

    t: jax.Array
    prev: jax.Array
    embedding: jax.Array
    done: jax.Array


class SyntheticEnv:
    """Gymnax-style single env: ``reset(key, params, seeds)``, ``step(key, state, action, params)``."""

    num_actions = NUM_ACTIONS

    def observation_size(self, params: SyntheticParams) -> int:
        """``embed_dim + num_actions + 1``."""
        return params.embed_dim + NUM_ACTIONS + 1

    def _obs(self, state: SyntheticState, params: SyntheticParams) -> jax.Array:
        prev = jnp.where(state.prev >= 0, jax.nn.one_hot(state.prev, NUM_ACTIONS), 0.0)
        frac = jnp.reshape(state.t / params.horizon, (1,))
        return jnp.concatenate([state.embedding, prev, frac]).astype(jnp.float32)

    def reset(self, key: jax.Array, params: SyntheticParams, seeds: jax.Array | None = None):
        """Start an episode; the embedding is a random row of ``seeds [S, embed_dim]`` (default
        ``params.pool``; neither: N(0, 1))."""
        seeds = params.pool if seeds is None else seeds
        if seeds is None:
            emb = jax.random.normal(key, (params.embed_dim,))
        else:
            emb = seeds[jax.random.randint(key, (), 0, seeds.shape[0])]
        state = SyntheticState(
            t=jnp.zeros((), jnp.int32), prev=-jnp.ones((), jnp.int32), embedding=emb, done=jnp.zeros((), bool)
        )
        return self._obs(state, params), state

    def action_mask(self, state: SyntheticState, params: SyntheticParams) -> jax.Array:
        """Allowed operations ``bool [6]`` (the policy's action-mask hook)."""
        del state
        return params.allowed

    def step(self, key: jax.Array, state: SyntheticState, action: jax.Array, params: SyntheticParams):
        """Apply ``action``; returns ``(obs, state, reward, done, info)``."""
        del key
        t = state.t
        on_path = (t == 0) | (state.prev == params.optimal[jnp.maximum(t - 1, 0)])
        correct = (action == params.optimal[jnp.minimum(t, params.horizon - 1)]) & on_path & (t < params.horizon)
        reward = correct.astype(jnp.float32)
        terminated = (action == params.terminate_action) if params.terminate_action >= 0 else jnp.zeros((), bool)
        truncated = t + 1 >= params.horizon
        done = terminated | truncated
        new = SyntheticState(t=t + 1, prev=action.astype(jnp.int32), embedding=state.embedding, done=done)
        info = {
            "queries": {"instructor": jnp.ones((), jnp.float32), "reviewer": params.query_costs[action]},
            "terminated": terminated,
            "truncated": truncated & ~terminated,
        }
        return self._obs(new, params), new, reward, done, info


def make_synthetic(
    optimal: tuple[int, ...] = DEFAULT_OPTIMAL,
    embed_dim: int = 8,
    query_costs: tuple[float, ...] = (0.0,) * NUM_ACTIONS,
    allowed: tuple[bool, ...] = (True,) * NUM_ACTIONS,
    terminate_action: int = -1,
) -> tuple[SyntheticEnv, SyntheticParams]:
    """``(env, params)`` with the optimal sequence ``optimal`` (its length is the horizon)."""
    params = SyntheticParams(
        optimal=jnp.asarray(optimal, jnp.int32),
        query_costs=jnp.asarray(query_costs, jnp.float32),
        allowed=jnp.asarray(allowed, bool),
        horizon=len(optimal),
        embed_dim=embed_dim,
        terminate_action=terminate_action,
    )
    return SyntheticEnv(), params


def optimal_return(params: SyntheticParams) -> float:
    """Return of the optimal sequence (one per step)."""
    return float(params.horizon)


def random_return(params: SyntheticParams) -> float:
    """Expected return of the uniform policy over all six actions."""
    return 1.0 / NUM_ACTIONS + (params.horizon - 1) / NUM_ACTIONS**2


def synthetic_seeds(key: jax.Array, num: int = 32, embed_dim: int = 8) -> jax.Array:
    """A pool of ``num`` random embeddings (the env's ``seeds`` argument)."""
    return jax.random.normal(key, (num, embed_dim))


def _synthetic_env(config, *, roles=None, counter=None, seed: int = 0, **kwargs):
    """The factory's ``"synthetic"`` env (``env.make("synthetic", seed=...)``): ``make_synthetic(**kwargs)``
    with a pool of ``num_seeds`` (32) random embeddings drawn from ``seed + 1``. ``config`` (an
    ``EnvConfig``) is not read: the synthetic env has none of its settings."""
    num_seeds = int(kwargs.pop("num_seeds", 32))
    env, params = make_synthetic(**kwargs)
    pool = synthetic_seeds(jax.random.PRNGKey(seed + 1), num_seeds, params.embed_dim)
    return env, params.replace(pool=pool)


register_env("synthetic", _synthetic_env)
