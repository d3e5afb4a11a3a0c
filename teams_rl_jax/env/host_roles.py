"""The text roles as the env's operator and reward term: ``io_callback`` inside the jitted step.

Used when a role is behind HTTP (or reads another tokenizer than the env's buffers): the env's
buffers are decoded to text, the role is called once per env step for all live rows (stopped and
finished episodes are not sent), and the answers are encoded back into the buffers. With no local
tokenizer the buffers hold the env's lossless byte-level encoding (``env.byte_tokenizer``), so any
word the instructor writes survives the round trip; lengths in the served model's tokens come from
the endpoint's ``usage`` (:attr:`roles.instructor.InstructorReply.served_tokens`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.experimental  # noqa: F401  (io_callback)
import jax.numpy as jnp
import numpy as np

from teams_rl_jax.env.buffers import encode
from teams_rl_jax.env.rewards import RewardTerm
from teams_rl_jax.env.seeds import decode
from teams_rl_jax.roles.instructor import Instructor
from teams_rl_jax.roles.reviewer import EQUAL, Reviewer


def _texts(tokenizer, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
    return [t.strip() for t in decode(tokenizer, tokens, lengths)]


@dataclasses.dataclass(frozen=True, eq=False)
class HostOperator:
    """The env operator over the text :class:`Instructor` (``apply(key, op_ids, tokens, lengths, params,
    active)``). Returns ``(tokens, lengths, queries, served)``: ``served`` is the new instruction's
    length in the served model's tokens (-1 where unknown or unchanged).

    A rewrite that is empty, truncated (``finish_reason == "length"``) or longer than the buffer
    keeps the old instruction; it still cost its query, and ``stats["rejected"]`` counts it.
    ``with_truncated``: also return ``truncated [B]`` (cut or longer than the buffer: the env's
    elimination reason ``truncated``; an empty rewrite is not one).
    """

    instructor: Instructor
    tokenizer: Any
    operations: tuple[str, ...]
    max_len: int
    pad_id: int = 0
    stats: dict = dataclasses.field(default_factory=lambda: {"calls": 0, "rows": 0, "rejected": 0})
    wants_active = True
    reports_truncated = True

    def apply(self, key, op_ids, tokens, lengths, params=None, active=None, with_truncated: bool = False):
        if active is None:
            active = jnp.ones(op_ids.shape, bool)
        seed = jax.random.randint(key, (), 0, np.iinfo(np.int32).max)
        shapes = (jax.ShapeDtypeStruct(tokens.shape, jnp.int32), jax.ShapeDtypeStruct(lengths.shape, jnp.int32),
                  jax.ShapeDtypeStruct(op_ids.shape, jnp.float32), jax.ShapeDtypeStruct(lengths.shape, jnp.int32),
                  jax.ShapeDtypeStruct(lengths.shape, jnp.bool_))
        out = jax.experimental.io_callback(self._host, shapes, op_ids, tokens, lengths, active, seed, ordered=False)
        return out if with_truncated else out[:4]

    def _host(self, op_ids, tokens, lengths, active, seed):
        tokens, lengths = np.array(tokens, np.int32), np.array(lengths, np.int32)
        queries = np.zeros(op_ids.shape, np.float32)
        served = np.full(lengths.shape, -1, np.int32)
        cut = np.zeros(lengths.shape, bool)
        rows = np.nonzero(np.asarray(active))[0]
        if rows.size == 0:
            return tokens, lengths, queries, served, cut
        texts = _texts(self.tokenizer, tokens[rows], lengths[rows])
        outs = self.instructor.rewrite(texts, [self.operations[int(op_ids[r])] for r in rows], seed=int(seed))
        self.stats["calls"] += 1
        self.stats["rows"] += int(rows.size)
        for r, out in zip(rows, outs):
            queries[r] = 1.0
            ids = encode(self.tokenizer, out.text) if out.text else []
            if out.truncated or not ids or len(ids) > self.max_len:
                self.stats["rejected"] += 1
                cut[r] = bool(out.truncated or len(ids) > self.max_len)
                continue
            tokens[r] = self.pad_id
            tokens[r, : len(ids)] = ids
            lengths[r] = len(ids)
            served[r] = -1 if out.served_tokens is None else out.served_tokens
        return tokens, lengths, queries, served, cut


def host_reviewer_term(reviewer: Reviewer, tokenizer, *, name: str = "reviewer") -> RewardTerm:
    """The text :class:`Reviewer` as an env reward term (``role="reviewer"``, one query per live row):
    1.0 for Not Equal, 0.0 for Equal and for an unparseable reply (``term.fn.stats["unparseable"]``)."""

    def host(old_t, old_n, new_t, new_n, active):
        out = np.zeros(np.shape(old_n), np.float32)
        rows = np.nonzero(np.asarray(active))[0]
        if rows.size == 0:
            return out
        olds = _texts(tokenizer, np.asarray(old_t)[rows], np.asarray(old_n)[rows])
        news = _texts(tokenizer, np.asarray(new_t)[rows], np.asarray(new_n)[rows])
        for r, v in zip(rows, reviewer.judge(olds, news)):
            out[r] = EQUAL if v is None else v
        return out

    def fn(key, old, new, aux):
        active = aux.get("active")
        if active is None:
            active = jnp.ones(old.length.shape, bool)
        return jax.experimental.io_callback(host, jax.ShapeDtypeStruct(old.length.shape, jnp.float32),
                                            old.tokens, old.length, new.tokens, new.length, active, ordered=False)

    fn.stats = reviewer.stats  # RewardTerm is frozen: the counts hang on its function (term.fn.stats)
    return RewardTerm(name, fn, role="reviewer", cost=1.0, verdict="decoded")
