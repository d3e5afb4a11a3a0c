"""Reward terms: registered by name, weighted in ``EnvConfig.reward_weights``, summed by the env.

A term is ``fn(key, before, after, aux) -> float32 [B]`` on batched :class:`Instruction` pytrees
(``tokens [B, L]``, ``length [B]``, ``embedding [B, D]``, ``distinct [B]``). ``aux`` holds ``op``
(``int32 [B]``), ``step`` (``int32 [B]``), ``params`` (the term's own pytree from
``EnvParams.term_params[name]``, e.g. a reviewer LM's weights; ``None`` if it has none) and ``terms``
(values of the terms computed before it, in config order). The single-env step calls terms with
``B = 1`` and ``jax.vmap`` lifts them to the batch. Each call of a term with ``role`` set costs
``cost`` queries of that role (the reviewer judge: ``role="reviewer", cost=1``), reported per step in
``info["queries"]``.

Token-edit pre-training reward (the default weights), per step:

    r = 1.0 * novelty + 0.5 * length_gain + 0.5 * distinct_gain - sum(elimination penalties)

* ``novelty``: cosine distance ``1 - cos`` of the old and new instruction embeddings (how much the
  wording moved, in [0, 2]).
* ``length_gain``: ``clip((len_new - len_old) / length_scale, -1, 1)``, ``length_scale = 20`` tokens,
  the paper's 10 to 20 added words per in-depth step (a complexity proxy that saturates, so a long
  paste is not worth more than a good clause).
* ``distinct_gain``: ``clip((distinct_new - distinct_old) / distinct_scale, -1, 1)``: new vocabulary,
  so repeating the same kind of clause earns less each time.

Nothing is keyed to an action; the differences come from what each edit does to the instruction
and how that interacts with the state: appending to a long instruction moves its embedding less,
repeated clauses add few new tokens, breadth restarts from a short seed (high novelty, but it throws
away the length and vocabulary gained so far), an edit that no longer fits the ``max_len`` buffer
changes nothing and pays the ``no_gain`` penalty. So some operation sequences are clearly better than
others, and the best ones depend on the step and the instruction (the tests check both).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from teams_rl_jax.env.buffers import Instruction
from teams_rl_jax.env.embedding import cosine_distance
from teams_rl_jax.env.registry import Registry

TermFn = Callable[[jax.Array, Instruction, Instruction, dict], jax.Array]


@dataclasses.dataclass(frozen=True)
class RewardTerm:
    """A named reward term: ``fn``, the query role it spends (or None) and its cost per call.

    ``init(config) -> pytree`` builds its default ``aux["params"]`` from the ``EnvConfig`` (or None).
    ``verdict`` (reviewer terms): ``"decoded"`` = the reviewer's decoded reply, parsed (0/1; ``reward:
    reviewer_binary``), ``"soft"`` = P(Not Equal) from one forward pass (``reward: reviewer_soft``).
    """

    name: str
    fn: TermFn
    role: str | None = None
    cost: float = 0.0
    init: Callable[[Any], Any] | None = None
    verdict: str | None = None


# ``EnvConfig.reward`` -> the reviewer term's ``verdict`` it needs.
REVIEWER_REWARDS = {"reviewer_binary": "decoded", "reviewer_soft": "soft"}


REWARD_TERMS: Registry[RewardTerm] = Registry("reward term")


def register_term(term: RewardTerm) -> RewardTerm:
    """Register (or replace) ``term`` under ``term.name``."""
    return REWARD_TERMS.register(term.name, term)


def novelty(key: jax.Array, before: Instruction, after: Instruction, aux: dict) -> jax.Array:
    """Cosine distance between the old and new instruction embeddings."""
    return cosine_distance(before.embedding, after.embedding)


def length_gain(key: jax.Array, before: Instruction, after: Instruction, aux: dict) -> jax.Array:
    """Clipped token-length gain, ``clip(delta / scale, -1, 1)``: in the served model's tokens
    (``Instruction.served``) where both are known, else in buffer tokens."""
    delta = after.length - before.length
    if before.served is not None and after.served is not None:
        known = (before.served >= 0) & (after.served >= 0)
        delta = jnp.where(known, after.served - before.served, delta)
    delta = delta.astype(jnp.float32)
    return jnp.clip(delta / aux["params"]["scale"], -1.0, 1.0)


def distinct_gain(key: jax.Array, before: Instruction, after: Instruction, aux: dict) -> jax.Array:
    """Clipped gain in distinct token ids, ``clip(delta / scale, -1, 1)``."""
    delta = (after.distinct - before.distinct).astype(jnp.float32)
    return jnp.clip(delta / aux["params"]["scale"], -1.0, 1.0)


register_term(RewardTerm("novelty", novelty))
register_term(RewardTerm("length_gain", length_gain,
                         init=lambda cfg: {"scale": jnp.asarray(cfg.length_scale, jnp.float32)}))
register_term(RewardTerm("distinct_gain", distinct_gain,
                         init=lambda cfg: {"scale": jnp.asarray(cfg.distinct_scale, jnp.float32)}))
