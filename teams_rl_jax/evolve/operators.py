"""Who carries out an operation on instruction *text* in the generate stage: an LLM role (the one
text instructor, ``roles.instructor``), or the env's LLM-free token-edit operator (the offline default).

``apply(texts, ops, rows, seed_ids, t) -> [(new_text, truncated, queries)]``; ``rows`` index the
stage's seed list (the token-edit breadth operation draws a new seed of the same domain from it).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from teams_rl_jax.env import make
from teams_rl_jax.env.seeds import decode, seeds_from_texts
from teams_rl_jax.evolve.records import Seed
from teams_rl_jax.evolve.selectors import row_seed
from teams_rl_jax.roles.instructor import Instructor


class LLMRewriter:
    """An LLM role rewrites (the instructor, or the expert in the paper's single-model setting): the
    text :class:`~teams_rl_jax.roles.instructor.Instructor`, one batched ``complete`` per step."""

    def __init__(self, backend: Any, *, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                 prompts: Any = None):
        self.instructor = Instructor(backend, max_new_tokens, temperature, top_p, prompts=prompts)
        self.role = backend.role
        self.seed = seed

    def apply(self, texts: Sequence[str], ops: Sequence[str], rows: Sequence[int], seed_ids: Sequence[str], t: int):
        return [(r.text, r.truncated, {self.role: 1}) for r in self.instructor.rewrite(texts, ops, seed=self.seed)]


_TOKEN_EDIT: dict[tuple, "TokenEditRewriter"] = {}


def token_edit_operator(seeds: Sequence[Seed], *, seed: int = 0, max_len: int = 256, batch: int = 32):
    """A :class:`TokenEditRewriter` for these seeds, shared within the process: the policy run and its
    baselines (same seeds) reuse one build and one compiled edit instead of compiling it again."""
    key = (tuple((s.id, s.text, s.domain) for s in seeds), seed, max_len, batch)
    if key not in _TOKEN_EDIT:
        _TOKEN_EDIT.clear()  # keep one
        _TOKEN_EDIT[key] = TokenEditRewriter(seeds, seed=seed, max_len=max_len, batch=batch)
    return _TOKEN_EDIT[key]


class TokenEditRewriter:
    """The env's token-edit operator (``env.token_edit.TokenEditOperator``) on text: tokenize, edit
    (jitted, batched), decode. 0 queries.

    Its tokenizer is built from the stage's own seeds and the env's phrase banks, so no word of a
    seed is lost to ``<unk>``; the breadth pool is the stage's seeds.
    """

    role = None

    def __init__(self, seeds: Sequence[Seed], *, seed: int = 0, max_len: int = 256, batch: int = 32):
        self.env, self.params = make("token_edit", seeds=[s.text for s in seeds], domains=[s.domain for s in seeds],
                                     max_len=max_len, on_long_seed="truncate")
        self.ops = self.env.operations
        self.tok = self.env.tokenizer
        self.seed, self.batch, self.max_len = seed, batch, max_len
        op = self.env.operator
        self._apply = jax.jit(lambda params, key, op_ids, tokens, lengths, dom, sid: op.apply(
            key, op_ids, tokens, lengths, params, context={"domain": dom, "seed": sid}))

    def apply(self, texts, ops, rows, seed_ids, t):
        n = len(texts)
        if not n:
            return []
        width = max(self.batch, n)
        b = seeds_from_texts(list(texts) + [texts[0]] * (width - n), self.tok, self.max_len, on_long="truncate")
        op_ids = jnp.asarray([self.ops.index(o) for o in ops] + [0] * (width - n), jnp.int32)
        pool_dom = np.asarray(self.params.seeds.domains)
        dom = jnp.asarray([int(pool_dom[r]) for r in rows] + [-1] * (width - n), jnp.int32)
        sid = jnp.asarray(list(rows) + [-1] * (width - n), jnp.int32)
        key = jax.random.PRNGKey(row_seed(self.seed, seed_ids[0], t) ^ n)
        new_t, new_n, _ = self._apply(self.params.operator, key, op_ids, b.tokens, b.lengths, dom, sid)
        out = decode(self.tok, np.asarray(new_t)[:n], np.asarray(new_n)[:n])
        return [(x, False, {}) for x in out]
