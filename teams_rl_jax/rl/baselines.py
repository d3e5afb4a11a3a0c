"""Baseline operation choosers: WizardLM's uniform choice and fixed per-step schedules.

``paper`` is the schedule the TeaMs-RL reference generator actually ran
(``Teams_RL_GPT/teams_rl/runner/generate_data_alpaca.py``): at 0-based steps ``t = 1`` and ``t = 4``
(the 2nd and 5th evolution) the action is overridden to ``breadth``; at every other step the policy's
sampled action is used, except that ``breadth`` is replaced by ``add_constraints``, and the sampled
action had +0.7 added to the ``add_constraints`` score, which makes it the usual choice. As a fixed
schedule this is ``add_constraints, breadth, add_constraints, add_constraints, breadth,
add_constraints``; :func:`paper_overrides` applies the same override rules to any policy's actions
(the generate stage's ``protocol: paper`` uses it, ``evolve.selectors.PaperOverrides``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from teams_rl_jax.errors import ConfigError
from teams_rl_jax.models import policy as P
from teams_rl_jax.rl.algorithm import Algorithm
from teams_rl_jax.rl.config import NAMED_SCHEDULES, OPERATIONS, validate_schedule

# 0-based steps at which the reference generator forces breadth.
PAPER_BREADTH_STEPS = (1, 4)


def paper_schedule(horizon: int = 6) -> tuple[str, ...]:
    """Operation names of the ``paper`` schedule for ``horizon`` steps (see module docstring)."""
    return tuple("breadth" if t in PAPER_BREADTH_STEPS else "add_constraints" for t in range(horizon))


def schedule_ops(schedule: tuple[str, ...], horizon: int) -> tuple[str, ...]:
    """Expand a schedule (a named one, or op names with the last one repeating) to ``horizon`` names."""
    validate_schedule(schedule, "schedule")
    if len(schedule) == 1 and schedule[0] in NAMED_SCHEDULES:
        name = schedule[0]
        if name == "paper":
            return paper_schedule(horizon)
        if name == "round_robin":
            return tuple(OPERATIONS[t % len(OPERATIONS)] for t in range(horizon))
        raise ConfigError(f"schedule: no rule for {name!r}")  # pragma: no cover - NAMED_SCHEDULES in sync
    ops = list(schedule[:horizon])
    ops += [schedule[-1]] * (horizon - len(ops))
    return tuple(ops)


def schedule_table(
    schedule: tuple[str, ...], horizon: int, operations: tuple[str, ...] = OPERATIONS
) -> np.ndarray:
    """Action ids ``int32 [horizon]`` of a schedule, for an env whose actions are ``operations``."""
    ops = schedule_ops(schedule, horizon)
    missing = [op for op in ops if op not in operations]
    if missing:
        raise ConfigError(f"schedule: operation {missing[0]!r} is not an action of this env ({', '.join(operations)})")
    return np.asarray([operations.index(op) for op in ops], dtype=np.int32)


def uniform_logits(mask: jax.Array) -> jax.Array:
    """Logits of the uniform distribution over allowed actions (``mask [..., A]`` bool)."""
    return P.masked_logits(jnp.zeros(mask.shape, jnp.float32), mask)


def random_action(key: jax.Array, mask: jax.Array) -> jax.Array:
    """WizardLM's choice: an operation uniformly at random among the allowed ones (``[...]`` int32)."""
    return P.sample(key, uniform_logits(mask))


def fixed_action(table: jax.Array, t: jax.Array, key: jax.Array, mask: jax.Array) -> jax.Array:
    """The schedule's action at step ``t`` (clamped to the table), or a uniform allowed one if masked.

    ``mask`` is ``[N, A]``; returns ``int32 [N]``.
    """
    table = jnp.asarray(table, jnp.int32)
    a = jnp.broadcast_to(table[jnp.minimum(t, table.shape[0] - 1)], mask.shape[:-1])
    allowed = jnp.take_along_axis(mask, a[..., None], axis=-1)[..., 0]
    return jnp.where(allowed, a, random_action(key, mask))


def paper_overrides(t: jax.Array, actions: jax.Array, operations: tuple[str, ...] = OPERATIONS) -> jax.Array:
    """Apply the reference generator's overrides to policy ``actions`` taken at 0-based step ``t``.

    ``breadth`` at steps 1 and 4; elsewhere a chosen ``breadth`` becomes ``add_constraints``
    (action ids index ``operations``, the env's action list).
    """
    breadth, add_constraints = operations.index("breadth"), operations.index("add_constraints")
    forced = jnp.isin(t, jnp.asarray(PAPER_BREADTH_STEPS))
    other = jnp.where(actions == breadth, add_constraints, actions)
    return jnp.where(forced, breadth, other).astype(jnp.int32)


def _no_learning(params, opt_state, traj, last, multiplier, key):
    return params, opt_state, {}


def make_random(config, num_actions: int):
    """WizardLM's uniform choice as an :class:`~teams_rl_jax.rl.algorithm.Algorithm` (nothing to learn)."""
    def act(params, key, obs, t, mask):
        return random_action(key, mask), uniform_logits(mask), jnp.zeros(mask.shape[:-1])

    return Algorithm(lambda key, obs_dim: ({}, ()), act, _no_learning)


def make_fixed(config, num_actions: int, operations: tuple[str, ...]):
    """A fixed per-step schedule (``config.schedule``) as an :class:`~teams_rl_jax.rl.algorithm.Algorithm`."""
    table = schedule_table(config.schedule, config.num_steps, operations)  # numpy: a small constant

    def act(params, key, obs, t, mask):
        action = fixed_action(table, t, key, mask)
        onehot = jax.nn.one_hot(action, num_actions) > 0
        return action, P.masked_logits(jnp.zeros(mask.shape, jnp.float32), onehot), jnp.zeros(mask.shape[:-1])

    return Algorithm(lambda key, obs_dim: ({}, ()), act, _no_learning)
