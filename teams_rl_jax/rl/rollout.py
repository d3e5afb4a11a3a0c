"""The rollout every algorithm shares: reset ``N`` envs, step them ``T`` times, record transitions.

PureJaxRL's shape: the env is vectorised once here (``step_batch``/``reset_batch`` when the env has a
batched path, else ``jax.vmap`` of its single-env functions), an algorithm only says how to act
(:class:`~teams_rl_jax.rl.algorithm.Algorithm`). Rollouts are episode-aligned: each update resets
every env; transitions after an episode's ``done`` have ``valid == 0`` and count for nothing.

``env_params`` and ``seeds`` are arguments of every function here (never closure constants), so a
7B instructor's weights inside ``env_params`` are traced inputs of the compiled program.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct as struct
import jax
import jax.numpy as jnp
import numpy as np

from teams_rl_jax.errors import ConfigError
from teams_rl_jax.models import policy as P
from teams_rl_jax.rl.config import OPERATIONS, PolicyConfig
from teams_rl_jax.rl.gae import masked_mean
from teams_rl_jax.rl.lagrange import query_cost


@struct.dataclass
class Transition:
    """One rollout step for all envs (stacked to ``[T, N, ...]`` by the rollout)."""

    obs: jax.Array
    action: jax.Array
    logits: jax.Array  # acting distribution (masked), also the "old" policy for the update
    value: jax.Array
    reward: jax.Array
    done: jax.Array
    valid: jax.Array  # 1.0 while the episode had not ended before this step
    queries: dict
    action_mask: jax.Array
    eliminated: dict = struct.field(default_factory=dict)  # reason -> 1.0 where this step was eliminated


@struct.dataclass
class RolloutCarry:
    """Carry of the rollout: env states, current observations, which episodes are still running."""

    env_state: Any
    obs: jax.Array
    alive: jax.Array
    key: jax.Array


def env_operations(env) -> tuple[str, ...]:
    """Names of the env's actions (``env.operations``, else the default six)."""
    ops = tuple(getattr(env, "operations", OPERATIONS))
    if len(ops) != int(env.num_actions):
        raise ConfigError(f"env.operations has {len(ops)} names for {env.num_actions} actions")
    return ops


def static_action_mask(config: PolicyConfig, operations: tuple[str, ...]) -> np.ndarray:
    """``bool [A]``: False for ``config.disabled_ops`` (by name, in the env's action order)."""
    missing = [op for op in config.disabled_ops if op not in operations]
    if missing:
        raise ConfigError(f"disabled_ops: {missing[0]!r} is not an action of this env ({', '.join(operations)})")
    mask = np.asarray([op not in config.disabled_ops for op in operations])
    if not mask.any():
        raise ConfigError("disabled_ops disables every action of this env")
    return mask


def vector_env(env, num_envs: int):
    """``(reset(key, params, seeds), step(key, states, actions, params))`` over ``num_envs`` envs.

    An env with ``reset_batch``/``step_batch`` steps all rows in one call (the LLM env: one batched
    instructor generate per step, not ``N`` batch-1 generates under vmap); otherwise the single-env
    functions are vmapped (keys split per env).
    """
    if callable(getattr(env, "step_batch", None)):
        def step(key, states, actions, params):
            return env.step_batch(key, states, actions, params)
    else:
        def step(key, states, actions, params):
            return jax.vmap(env.step, in_axes=(0, 0, 0, None))(jax.random.split(key, num_envs), states, actions, params)

    if callable(getattr(env, "reset_batch", None)):
        def reset(key, params, seeds):
            return env.reset_batch(jax.random.split(key, num_envs), params, seeds)
    else:
        def reset(key, params, seeds):
            return jax.vmap(env.reset, in_axes=(0, None, None))(jax.random.split(key, num_envs), params, seeds)

    return reset, step


def make_rollout(config: PolicyConfig, env, act: Callable):
    """``(reset, step, rollout)`` for ``config.num_envs`` envs acting with ``act``.

    ``act(params, key, obs [N, D], t, mask [N, A]) -> (action [N], logits [N, A], value [N])``.
    ``reset(key, env_params, seeds) -> RolloutCarry``; ``step(params, carry, t, env_params) ->
    (carry, Transition)``; ``rollout(params, key, env_params, seeds) -> (last carry, traj [T, N])``.
    """
    N, T = config.num_envs, config.num_steps
    num_actions = int(env.num_actions)
    mask0 = static_action_mask(config, env_operations(env))
    has_env_mask = callable(getattr(env, "action_mask", None))
    vreset, vstep = vector_env(env, N)

    def action_mask(env_state, env_params) -> jax.Array:
        m = jnp.broadcast_to(jnp.asarray(mask0), (N, num_actions))
        if has_env_mask:
            m = m & jax.vmap(env.action_mask, in_axes=(0, None))(env_state, env_params).astype(bool)
        return m

    def reset(key, env_params, seeds) -> RolloutCarry:
        obs, env_state = vreset(key, env_params, seeds)
        return RolloutCarry(env_state=env_state, obs=obs, alive=jnp.ones((N,), jnp.float32), key=key)

    def step(params, carry: RolloutCarry, t, env_params):
        key, k_act, k_env = jax.random.split(carry.key, 3)
        mask = action_mask(carry.env_state, env_params)
        action, logits, value = act(params, k_act, carry.obs, t, mask)
        obs, env_state, reward, done, info = vstep(k_env, carry.env_state, action, env_params)
        done = done.astype(bool)
        tr = Transition(
            obs=carry.obs, action=action, logits=logits, value=value,
            reward=reward.astype(jnp.float32) * carry.alive,
            done=done, valid=carry.alive,
            queries={k: jnp.asarray(v, jnp.float32) * carry.alive for k, v in info["queries"].items()},
            action_mask=mask,
            eliminated={k: jnp.asarray(v, jnp.float32) * carry.alive for k, v in info.get("eliminated", {}).items()},
        )
        alive = carry.alive * (1.0 - done.astype(jnp.float32))
        return RolloutCarry(env_state=env_state, obs=obs, alive=alive, key=key), tr

    def rollout(params, key, env_params, seeds):
        carry = reset(key, env_params, seeds)
        return jax.lax.scan(lambda c, t: step(params, c, t, env_params), carry, jnp.arange(T, dtype=jnp.int32))

    return reset, step, rollout


def pad_steps(steps: list[Transition], T: int) -> Transition:
    """Stack host-stepped transitions to ``[T, N]``, padding an early-stopped rollout with invalid
    copies (so the update compiles once whatever the number of steps actually taken)."""
    last = steps[-1]
    pad = last.replace(valid=jnp.zeros_like(last.valid), reward=jnp.zeros_like(last.reward),
                       queries=jax.tree_util.tree_map(jnp.zeros_like, last.queries),
                       eliminated=jax.tree_util.tree_map(jnp.zeros_like, last.eliminated))
    steps = list(steps) + [pad] * (T - len(steps))
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *steps)


def rollout_metrics(traj: Transition, num_actions: int, roles: tuple[str, ...]) -> dict[str, Any]:
    """Per-update statistics of an episode-aligned rollout (means over episodes / valid steps)."""
    valid = traj.valid
    per_episode = lambda x: jnp.mean(jnp.sum(x * valid, axis=0))  # noqa: E731
    onehot = jax.nn.one_hot(traj.action, num_actions) * valid[..., None]
    by_step = jnp.sum(onehot, axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1.0)[:, None]
    queries = {k: per_episode(v) for k, v in traj.queries.items()}
    # Eliminated steps per episode by reason; absent for an env without rules (a saved-metrics file
    # cannot hold an empty dict, and a resumed history must keep one structure).
    eliminated = {"eliminated": {k: per_episode(v) for k, v in traj.eliminated.items()}} if traj.eliminated else {}
    return {
        "return": per_episode(traj.reward),
        "episode_length": per_episode(jnp.ones_like(valid)),
        "queries": queries,
        "queries_total": sum(queries.values()) if queries else jnp.zeros(()),
        "cost": per_episode(query_cost(traj.queries, roles)) if queries else jnp.zeros(()),
        "op_histogram": jnp.sum(onehot, axis=(0, 1)) / jnp.maximum(jnp.sum(valid), 1.0),
        "op_by_step": by_step,
        "entropy": masked_mean(P.entropy(traj.logits), valid),
        **eliminated,
    }
