"""``make_train``: PureJaxRL-shaped training for TRPO, PPO and the random / fixed baselines.

``train = make_train(config, env, env_params, seeds)`` returns ``train(key) -> (runner_state,
metrics)``. With ``config.loop == "jit"`` the whole loop (reset, rollout scan, GAE, update, Lagrange
step, for ``num_updates`` updates) is one traceable function: ``jax.jit(train)``, or
``jax.jit(jax.vmap(train))(keys)`` for several seeds. With ``loop == "host"`` the update loop runs
in Python around a jitted update (and, with ``host_rollout == "step"``, the rollout steps the env one
jitted step at a time and stops once all episodes are done), for envs whose step is expensive.

Rollouts are episode-aligned: each update resets ``num_envs`` envs and runs ``num_steps`` steps;
transitions after an episode's ``done`` have ``valid == 0`` and are ignored by every loss and metric.
Baselines go through the same rollout and metrics, so comparisons are on equal episode (and query)
counts. ``metrics`` has one entry per update (leading axis ``num_updates``): ``return`` (mean
episode return), ``episode_length``, ``queries`` (role -> mean per episode), ``queries_total``,
``cost`` (the budgeted queries), ``lagrange``, ``kl``, ``policy_loss``, ``value_loss``, ``entropy``,
``op_histogram [A]`` (fraction of valid steps per op), ``op_by_step [T, A]``, plus algorithm extras.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct as struct
import jax
import jax.numpy as jnp
import numpy as np

from teams_rl_jax.errors import ConfigError
from teams_rl_jax.models import policy as P
from teams_rl_jax.models.policy import ActorCritic
from teams_rl_jax.rl import baselines as B
from teams_rl_jax.rl.config import OPERATIONS, PolicyConfig
from teams_rl_jax.rl.gae import discounted_returns, gae, masked_mean, normalize
from teams_rl_jax.rl.lagrange import LagrangeState, lagrange_step, make_lagrange, query_cost
from teams_rl_jax.rl.ppo import make_optimizer, ppo_update
from teams_rl_jax.rl.trpo import Batch, trpo_update

LEARNED = ("trpo", "ppo")


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


@struct.dataclass
class RunnerState:
    """Everything carried across updates: network params, optimiser and multiplier states, key."""

    params: Any
    opt_state: Any
    lagrange: LagrangeState
    key: jax.Array
    update: jax.Array


@struct.dataclass
class RolloutCarry:
    """Carry of the rollout scan."""

    env_state: Any
    obs: jax.Array
    alive: jax.Array
    key: jax.Array


def make_network(config: PolicyConfig, num_actions: int) -> ActorCritic:
    """The actor-critic described by ``config`` (hidden sizes, activation)."""
    return ActorCritic(num_actions=num_actions, hidden_sizes=tuple(config.hidden_sizes), activation=config.activation)


def init_params(network: ActorCritic, key: jax.Array, obs_dim: int) -> Any:
    """Initial network params for observations of size ``obs_dim``."""
    return network.init(key, jnp.zeros((obs_dim,), jnp.float32))


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


def rollout_metrics(traj: Transition, num_actions: int, roles: tuple[str, ...]) -> dict[str, Any]:
    """Per-update statistics of an episode-aligned rollout (means over episodes / valid steps)."""
    valid = traj.valid
    per_episode = lambda x: jnp.mean(jnp.sum(x * valid, axis=0))  # noqa: E731
    onehot = jax.nn.one_hot(traj.action, num_actions) * valid[..., None]
    by_step = jnp.sum(onehot, axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1.0)[:, None]
    queries = {k: per_episode(v) for k, v in traj.queries.items()}
    return {
        "return": per_episode(traj.reward),
        "episode_length": per_episode(jnp.ones_like(valid)),
        "queries": queries,
        "queries_total": sum(queries.values()) if queries else jnp.zeros(()),
        "cost": per_episode(query_cost(traj.queries, roles)) if queries else jnp.zeros(()),
        "op_histogram": jnp.sum(onehot, axis=(0, 1)) / jnp.maximum(jnp.sum(valid), 1.0),
        "op_by_step": by_step,
        "entropy": masked_mean(P.entropy(traj.logits), valid),
    }


def make_train(
    config: PolicyConfig,
    env,
    env_params: Any,
    seeds: Any = None,
    *,
    on_update: Callable[[int, dict], None] | None = None,
) -> Callable[[jax.Array], tuple[RunnerState, dict]]:
    """Build ``train(key) -> (runner_state, metrics)`` (see module docstring).

    Args:
      config: a validated :class:`PolicyConfig`.
      env, env_params: gymnax-style single env (``reset``, ``step``, ``num_actions``,
        ``observation_size``; optional ``action_mask(state, params) -> bool [A]``).
      seeds: the env's seed pytree, passed unbatched to every ``env.reset`` (the env picks by key).
      on_update: optional ``fn(update_index, metrics)`` called after each update (host callback
        under ``loop="jit"``; metrics as numpy).
    """
    config.validate()
    num_actions = int(env.num_actions)
    obs_dim = int(env.observation_size(env_params))
    N, T = config.num_envs, config.num_steps
    algo = config.algo
    network = make_network(config, num_actions)
    operations = env_operations(env)
    mask0 = jnp.asarray(static_action_mask(config, operations))
    table = jnp.asarray(B.schedule_table(config.schedule, T, operations)) if algo == "fixed" else None
    tx = make_optimizer(config.ppo, config.num_updates) if algo == "ppo" else None
    lag_tx, lag0 = make_lagrange(config.queries)
    roles = tuple(config.queries.roles)
    has_env_mask = callable(getattr(env, "action_mask", None))

    # ---- env and acting -------------------------------------------------------------------------
    def action_mask(env_state) -> jax.Array:
        m = jnp.broadcast_to(mask0, (N, num_actions))
        if has_env_mask:
            m = m & jax.vmap(env.action_mask, in_axes=(0, None))(env_state, env_params).astype(bool)
        return m

    def reset(key):
        keys = jax.random.split(key, N)
        obs, env_state = jax.vmap(env.reset, in_axes=(0, None, None))(keys, env_params, seeds)
        return RolloutCarry(env_state=env_state, obs=obs, alive=jnp.ones((N,), jnp.float32), key=key)

    def act(params, key, obs, t, mask):
        """(action [N], acting logits [N, A], value [N])."""
        if algo in LEARNED:
            logits, value = network.apply(params, obs, mask)
            return P.sample(key, logits), logits, value
        if algo == "random":
            action = B.random_action(key, mask)
            return action, B.uniform_logits(mask), jnp.zeros((N,))
        action = B.fixed_action(table, t, key, mask)
        onehot = jax.nn.one_hot(action, num_actions) > 0
        return action, P.masked_logits(jnp.zeros((N, num_actions)), onehot), jnp.zeros((N,))

    def env_step(params, carry: RolloutCarry, t):
        key, k_act, k_env = jax.random.split(carry.key, 3)
        mask = action_mask(carry.env_state)
        action, logits, value = act(params, k_act, carry.obs, t, mask)
        obs, env_state, reward, done, info = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
            jax.random.split(k_env, N), carry.env_state, action, env_params
        )
        done = done.astype(bool)
        tr = Transition(
            obs=carry.obs, action=action, logits=logits, value=value,
            reward=reward.astype(jnp.float32) * carry.alive,
            done=done, valid=carry.alive,
            queries={k: jnp.asarray(v, jnp.float32) * carry.alive for k, v in info["queries"].items()},
            action_mask=mask,
        )
        alive = carry.alive * (1.0 - done.astype(jnp.float32))
        return RolloutCarry(env_state=env_state, obs=obs, alive=alive, key=key), tr

    def rollout_scan(params, key):
        carry = reset(key)
        carry, traj = jax.lax.scan(
            lambda c, t: env_step(params, c, t), carry, jnp.arange(T, dtype=jnp.int32)
        )
        return carry, traj

    # ---- learning -------------------------------------------------------------------------------
    def learn(rs: RunnerState, traj: Transition, last: RolloutCarry, key) -> tuple[RunnerState, dict]:
        metrics = rollout_metrics(traj, num_actions, roles)
        lam = rs.lagrange.multiplier
        extra: dict[str, Any] = {"kl": jnp.zeros(()), "policy_loss": jnp.zeros(()), "value_loss": jnp.zeros(())}
        params, opt_state = rs.params, rs.opt_state
        if algo in LEARNED:
            reward = traj.reward
            if config.queries.enabled:
                reward = reward - lam * query_cost(traj.queries, roles)
            # Steps after an episode ended are terminal too, so nothing leaks across the boundary.
            done = traj.done | (traj.valid == 0)
            last_value = network.apply(params, last.obs, method="value") * last.alive
            adv, targets = gae(reward, traj.value, done, last_value, config.gamma, config.gae_lambda)
            if algo == "trpo":
                # The reference regresses its critic on discounted returns, not GAE targets.
                targets = discounted_returns(reward, done, last_value, config.gamma)
            if config.normalize_advantages:
                adv = normalize(adv, traj.valid)
            flat = lambda x: x.reshape((T * N,) + x.shape[2:])  # noqa: E731
            batch = Batch(
                obs=flat(traj.obs), actions=flat(traj.action), advantages=flat(adv), targets=flat(targets),
                weights=flat(traj.valid), old_logits=flat(traj.logits), old_values=flat(traj.value),
                action_mask=flat(traj.action_mask),
            )
            if algo == "trpo":
                params, learner = trpo_update(network, params, batch, config.trpo)
            else:
                params, opt_state, learner = ppo_update(network, params, opt_state, tx, batch, key, config.ppo)
            extra.update(learner)
        lagrange = rs.lagrange
        if config.queries.enabled:
            lagrange = lagrange_step(lag_tx, lagrange, metrics["cost"], config.queries.budget)
        metrics.update(extra)
        metrics["lagrange"] = lam
        new = RunnerState(params=params, opt_state=opt_state, lagrange=lagrange, key=rs.key, update=rs.update + 1)
        return new, metrics

    def split_keys(rs: RunnerState):
        key, k_roll, k_learn = jax.random.split(rs.key, 3)
        return rs.replace(key=key), k_roll, k_learn

    def update_step(rs: RunnerState, _=None):
        rs, k_roll, k_learn = split_keys(rs)
        last, traj = rollout_scan(rs.params, k_roll)
        rs, metrics = learn(rs, traj, last, k_learn)
        if on_update is not None and config.loop == "jit":
            jax.debug.callback(lambda i, m: on_update(int(np.asarray(i).reshape(-1)[0]) - 1, m), rs.update, metrics)
        return rs, metrics

    def init(key) -> RunnerState:
        key, k_net = jax.random.split(key)
        params = init_params(network, k_net, obs_dim) if algo in LEARNED else {}
        opt_state = tx.init(params) if tx is not None else None
        return RunnerState(params=params, opt_state=opt_state, lagrange=lag0, key=key,
                           update=jnp.zeros((), jnp.int32))

    # ---- loops ----------------------------------------------------------------------------------
    def train_jit(key):
        """Whole training as one traceable function: init, then ``lax.scan`` over updates."""
        rs = init(key)
        return jax.lax.scan(update_step, rs, None, config.num_updates)

    def train_host(key):
        """Python loop over updates around jitted pieces; metrics come back stacked as numpy."""
        rs = init(key)
        history = []
        if config.host_rollout == "scan":
            step_fn = jax.jit(update_step)
        else:
            reset_j = jax.jit(reset)
            env_step_j = jax.jit(env_step)
            learn_j = jax.jit(learn)

            def step_fn(rs):
                rs, k_roll, k_learn = split_keys(rs)
                carry, steps = reset_j(k_roll), []
                for t in range(T):
                    carry, tr = env_step_j(rs.params, carry, jnp.asarray(t, jnp.int32))
                    steps.append(tr)
                    if not bool(jnp.any(carry.alive > 0)):
                        break  # every episode is over: skip the remaining (expensive) env steps
                # Pad to the fixed length T with invalid copies so `learn` compiles once.
                last_tr = steps[-1]
                pad = last_tr.replace(valid=jnp.zeros_like(last_tr.valid), reward=jnp.zeros_like(last_tr.reward),
                                      queries=jax.tree_util.tree_map(jnp.zeros_like, last_tr.queries))
                steps += [pad] * (T - len(steps))
                traj = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *steps)
                return learn_j(rs, traj, carry, k_learn)

        for i in range(config.num_updates):
            rs, metrics = step_fn(rs)
            metrics = jax.device_get(metrics)
            history.append(metrics)
            if on_update is not None:
                on_update(i, metrics)
        stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *history)
        return rs, stacked

    return train_jit if config.loop == "jit" else train_host


def policy_action(
    network: ActorCritic,
    params: Any,
    key: jax.Array,
    obs: jax.Array,
    mask: jax.Array | None = None,
    greedy: bool = False,
) -> jax.Array:
    """Operation ids chosen by a trained policy for ``obs [..., obs_dim]`` (sampled, or argmax)."""
    logits = network.apply(params, obs, mask, method="logits")
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return P.sample(key, logits)
