"""``make_train``: PureJaxRL-shaped training, ``train(key, env_params, seeds) -> (runner_state, metrics)``.

The pieces: the shared rollout (:mod:`teams_rl_jax.rl.rollout`), one small file per algorithm
(``trpo.make_trpo``, ``ppo.make_ppo``, ``baselines.make_random`` / ``make_fixed``, each an
:class:`~teams_rl_jax.rl.algorithm.Algorithm`), the query-budget multiplier (``lagrange``), and the
loops here. ``env_params`` and ``seeds`` are ARGUMENTS of ``train``, never closure constants: with
an instructor and a reviewer LLM inside ``env_params`` (two 7B models, ~27 GB in bf16) a closed-over
pytree would be baked into the compiled program as constants, which cannot compile.

With ``config.loop == "jit"`` the whole loop (reset, rollout scan, GAE, update, Lagrange step, for
``num_updates`` updates) is one traceable function: ``jax.jit(train)``, or
``jax.jit(jax.vmap(train, in_axes=(0, None, None)))(keys, env_params, seeds)`` for several seeds.
With ``loop == "host"`` the update loop runs in Python around a jitted update (and, with
``host_rollout == "step"``, the rollout steps the env one jitted step at a time and stops once every
episode is done), for envs whose step is expensive or calls a remote LLM.

Baselines go through the same rollout and metrics, so comparisons are on equal episode (and query)
counts. ``metrics`` has one entry per update (leading axis ``num_updates``): ``return``,
``episode_length``, ``queries`` (role -> mean per episode), ``queries_total``, ``cost`` (the budgeted
queries), ``lagrange``, ``entropy``, ``op_histogram [A]``, ``op_by_step [T, A]``; learned algorithms
add ``kl``, ``policy_loss``, ``value_loss`` and their own extras.

:func:`make_trainer` exposes the pieces (``init``, one ``update``, ``run`` over a range of updates)
for the policy stage's checkpointed loop.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.struct as struct
import jax
import jax.numpy as jnp
import numpy as np

from teams_rl_jax.errors import ConfigError
from teams_rl_jax.models import policy as P
from teams_rl_jax.models.policy import ActorCritic
from teams_rl_jax.rl import baselines as B
from teams_rl_jax.rl.algorithm import Algorithm, init_params, make_network
from teams_rl_jax.rl.config import PolicyConfig
from teams_rl_jax.rl.lagrange import LagrangeState, lagrange_step, make_lagrange
from teams_rl_jax.rl.ppo import make_ppo
from teams_rl_jax.rl.rollout import (RolloutCarry, Transition, env_operations, make_rollout, pad_steps,
                                     rollout_metrics, static_action_mask)
from teams_rl_jax.rl.trpo import make_trpo

LEARNED = ("trpo", "ppo")

__all__ = ["LEARNED", "RolloutCarry", "RunnerState", "Trainer", "Transition", "env_operations", "init_params",
           "make_algorithm", "make_network", "make_train", "make_trainer", "policy_action", "static_action_mask"]


@struct.dataclass
class RunnerState:
    """Everything carried across updates: network params, optimiser and multiplier states, key,
    number of updates done. Saving it is enough to resume a run exactly."""

    params: Any
    opt_state: Any
    lagrange: LagrangeState
    key: jax.Array
    update: jax.Array


def make_algorithm(config: PolicyConfig, env) -> Algorithm:
    """The :class:`Algorithm` for ``config.algo`` on ``env``'s actions."""
    num_actions = int(env.num_actions)
    if config.algo == "trpo":
        return make_trpo(config, make_network(config, num_actions))
    if config.algo == "ppo":
        return make_ppo(config, make_network(config, num_actions))
    if config.algo == "random":
        return B.make_random(config, num_actions)
    if config.algo == "fixed":
        return B.make_fixed(config, num_actions, env_operations(env))
    raise ConfigError(f"algo: unknown algorithm {config.algo!r}")  # pragma: no cover - validated


class Trainer(NamedTuple):
    """The loop's pieces. ``init(key, env_params) -> RunnerState``;
    ``update(rs, env_params, seeds) -> (rs, metrics)`` (one update; jitted or host-stepped as the
    config says); ``run(rs, env_params, seeds, num) -> (rs, metrics stacked over num updates)``."""

    init: Callable[..., RunnerState]
    update: Callable[..., tuple[RunnerState, dict]]
    run: Callable[..., tuple[RunnerState, dict]]


def make_trainer(config: PolicyConfig, env, *, on_update: Callable[[int, dict], None] | None = None) -> Trainer:
    """Build the :class:`Trainer` (see :func:`make_train` for the arguments)."""
    config.validate()
    T = config.num_steps
    num_actions = int(env.num_actions)
    algo = make_algorithm(config, env)
    reset, env_step, rollout = make_rollout(config, env, algo.act)
    lag_tx, lag0 = make_lagrange(config.queries)
    roles = tuple(config.queries.roles)

    def init(key, env_params) -> RunnerState:
        key, k_net = jax.random.split(key)
        params, opt_state = algo.init(k_net, int(env.observation_size(env_params)))
        return RunnerState(params=params, opt_state=opt_state, lagrange=lag0, key=key,
                           update=jnp.zeros((), jnp.int32))

    def split_keys(rs: RunnerState):
        key, k_roll, k_learn = jax.random.split(rs.key, 3)
        return rs.replace(key=key), k_roll, k_learn

    def learn(rs: RunnerState, traj: Transition, last: RolloutCarry, key) -> tuple[RunnerState, dict]:
        metrics = rollout_metrics(traj, num_actions, roles)
        lam = rs.lagrange.multiplier
        params, opt_state, extra = algo.learn(rs.params, rs.opt_state, traj, last, lam, key)
        lagrange = rs.lagrange
        if config.queries.enabled:
            lagrange = lagrange_step(lag_tx, lagrange, metrics["cost"], config.queries.budget)
        metrics.update(extra)
        metrics["lagrange"] = lam
        return RunnerState(params=params, opt_state=opt_state, lagrange=lagrange, key=rs.key,
                           update=rs.update + 1), metrics

    def update_scan(rs: RunnerState, env_params, seeds):
        rs, k_roll, k_learn = split_keys(rs)
        last, traj = rollout(rs.params, k_roll, env_params, seeds)
        rs, metrics = learn(rs, traj, last, k_learn)
        if on_update is not None and config.loop == "jit":
            jax.debug.callback(lambda i, m: on_update(int(np.asarray(i).reshape(-1)[0]) - 1, m), rs.update, metrics)
        return rs, metrics

    if config.loop == "jit":
        def run(rs, env_params, seeds, num):
            return jax.lax.scan(lambda r, _: update_scan(r, env_params, seeds), rs, None, num)

        return Trainer(init, update_scan, run)

    if config.host_rollout == "scan":
        update = jax.jit(update_scan)
    else:
        reset_j, step_j, learn_j = jax.jit(reset), jax.jit(env_step), jax.jit(learn)

        def update(rs, env_params, seeds):
            rs, k_roll, k_learn = split_keys(rs)
            carry, steps = reset_j(k_roll, env_params, seeds), []
            for t in range(T):
                carry, tr = step_j(rs.params, carry, jnp.asarray(t, jnp.int32), env_params)
                steps.append(tr)
                if not bool(jnp.any(carry.alive > 0)):
                    break  # every episode is over: skip the remaining (expensive) env steps
            return learn_j(rs, pad_steps(steps, T), carry, k_learn)

    def run_host(rs, env_params, seeds, num):
        history = []
        for _ in range(num):
            rs, metrics = update(rs, env_params, seeds)
            metrics = jax.device_get(metrics)
            history.append(metrics)
            if on_update is not None:
                on_update(int(rs.update) - 1, metrics)
        return rs, jax.tree_util.tree_map(lambda *xs: np.stack(xs), *history)

    return Trainer(init, update, run_host)


def make_train(config: PolicyConfig, env, *, on_update: Callable[[int, dict], None] | None = None
               ) -> Callable[..., tuple[RunnerState, dict]]:
    """Build ``train(key, env_params, seeds=None) -> (runner_state, metrics)`` (see module docstring).

    Args:
      config: a validated :class:`PolicyConfig`.
      env: gymnax-style env (``reset``/``step`` or ``reset_batch``/``step_batch``, ``num_actions``,
        ``observation_size(params)``; optional ``action_mask(state, params) -> bool [A]``).
      on_update: optional ``fn(update_index, metrics)`` called after each update (host callback
        under ``loop="jit"``; metrics as numpy).
    ``train``'s ``seeds`` is the env's seed pytree, passed unbatched to every reset.
    """
    trainer = make_trainer(config, env, on_update=on_update)

    def train(key, env_params, seeds=None):
        rs = trainer.init(key, env_params)
        return trainer.run(rs, env_params, seeds, config.num_updates)

    return train


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
