"""Who carries out an operation on instruction *text*: an LLM role through its backend, or the
env's LLM-free token-edit operator (the offline default).

``apply(texts, ops, rows, seed_ids, t) -> [(new_text, truncated, queries)]``; ``rows`` index the
stage's seed list (the token-edit breadth operation draws a new seed of the same domain from it).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from teams_rl_jax.evolve.records import Seed
from teams_rl_jax.evolve.selectors import row_seed


def instructor_messages(op: str, text: str) -> list[dict]:
    """Chat messages asking for operation ``op`` on ``text``: the env's own (``env.prompts``), so the
    instructor is asked the same way in training and in generate."""
    from teams_rl_jax.env import prompts

    return prompts.instructor_messages(op, text)


def clean_rewrite(text: str) -> str:
    """The rewritten instruction from a reply: trimmed, without a leading label line."""
    text = text.strip()
    for label in ("Rewritten instruction:", "New instruction:", "#Rewritten Prompt#:", "#Rewritten Prompt#"):
        if text.lower().startswith(label.lower()):
            text = text[len(label):].strip()
    return text


class LLMOperator:
    """The instructor (or expert) rewrites: one batched ``complete`` per step for the whole batch."""

    def __init__(self, backend: Any, *, max_new_tokens: int, temperature: float, top_p: float, seed: int):
        self.backend = backend
        self.role = backend.role
        self.kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)

    def apply(self, texts: Sequence[str], ops: Sequence[str], rows: Sequence[int], seed_ids: Sequence[str], t: int):
        if not texts:
            return []
        got = self.backend.complete([instructor_messages(op, x) for op, x in zip(ops, texts)], **self.kw)
        return [(clean_rewrite(c.text), c.finish_reason == "length", {self.role: 1}) for c in got]


_TOKEN_EDIT: dict[tuple, "TokenEditOperator"] = {}


def token_edit_operator(seeds: Sequence[Seed], *, seed: int = 0, max_len: int = 256, batch: int = 32):
    """A :class:`TokenEditOperator` for these seeds, shared within the process: the policy run and its
    baselines (same seeds) reuse one build and one compiled edit instead of compiling it again."""
    key = (tuple((s.id, s.text, s.domain) for s in seeds), seed, max_len, batch)
    if key not in _TOKEN_EDIT:
        _TOKEN_EDIT.clear()  # keep one
        _TOKEN_EDIT[key] = TokenEditOperator(seeds, seed=seed, max_len=max_len, batch=batch)
    return _TOKEN_EDIT[key]


class TokenEditOperator:
    """The token-edit env operator on text: tokenize, edit (jitted, batched), decode. 0 queries.

    Its tokenizer is built from the stage's own seeds and the env's phrase banks, so no word of a
    seed is lost to ``<unk>``; the breadth pool is the stage's seeds.
    """

    role = None

    def __init__(self, seeds: Sequence[Seed], *, seed: int = 0, max_len: int = 256, batch: int = 32):
        from teams_rl_jax.env import make

        self.env, self.params = make("token_edit", seeds=[s.text for s in seeds], domains=[s.domain for s in seeds],
                                     max_len=max_len, on_long_seed="truncate")
        self.ops = self.env.operations
        self.tok = self.env.tokenizer
        self.seed, self.batch, self.max_len = seed, batch, max_len
        op = self.env.operator
        self._apply = jax.jit(lambda params, key, op_ids, tokens, lengths, dom, sid: op.apply(
            key, op_ids, tokens, lengths, params, context={"domain": dom, "seed": sid}))

    def apply(self, texts, ops, rows, seed_ids, t):
        from teams_rl_jax.env.seeds import decode, seeds_from_texts

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
