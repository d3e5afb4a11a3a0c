"""Fixed-size token buffers: splicing, n-gram search, and tokenizing phrases once at build time.

An instruction is a right-padded ``int32 [L]`` buffer plus its length. Everything here on buffers is
pure jnp on one buffer (batch with ``jax.vmap``); the tokenizing helpers run in Python when the env
is built.
"""

from __future__ import annotations

from typing import Sequence

import flax.struct as struct
import jax
import jax.numpy as jnp
import numpy as np


def splice(tokens: jax.Array, length: jax.Array, pos: jax.Array, cut: jax.Array, insert: jax.Array,
           insert_len: jax.Array, pad_id: int = 0):
    """Replace ``cut`` tokens at ``pos`` by ``insert[:insert_len]``: ``(new [L], new_len, fits)``.

    ``fits`` is False when the result is longer than the buffer; the returned buffer is then cut at
    ``L`` (callers usually keep the old buffer instead). Appending is ``pos = length, cut = 0``.
    """
    width = tokens.shape[-1]
    new_len = length - cut + insert_len
    j = jnp.arange(width)
    from_ins = jnp.take(insert, jnp.clip(j - pos, 0, insert.shape[-1] - 1))
    from_tail = jnp.take(tokens, jnp.clip(j - insert_len + cut, 0, width - 1))
    out = jnp.where(j < pos, tokens, jnp.where(j < pos + insert_len, from_ins, from_tail))
    out = jnp.where(j < new_len, out, pad_id).astype(jnp.int32)
    return out, jnp.minimum(new_len, width).astype(jnp.int32), new_len <= width


@struct.dataclass
class NgramGroup:
    """Patterns of one length ``n`` with a collision-free hash table over them.

    ``patterns int32 [R, n]``, ``ids int32 [R]`` (the phrase each row is a variant of),
    ``slots int32 [H]`` (row stored in each hash slot, -1 = empty), ``mult uint32 []`` (the hash
    multiplier, chosen at build time so that no two rows share a slot).
    """

    patterns: jax.Array
    ids: jax.Array
    slots: jax.Array
    mult: jax.Array


@struct.dataclass
class NgramSet:
    """Token n-gram patterns grouped by length (one :class:`NgramGroup` per length)."""

    groups: tuple

    @property
    def num_rows(self) -> int:
        """Total pattern rows over all groups (rows are numbered group by group)."""
        return sum(int(g.patterns.shape[0]) for g in self.groups)


def _window_hash(windows: Sequence, mult, bits: int, xp):
    """Slot of each n-token window (``windows[k]`` = k-th tokens, uint32); numpy at build, jnp in jit."""
    h = xp.full(windows[0].shape, 0x811C9DC5, xp.uint32)
    for w in windows:
        h = (h ^ w) * mult
        h = h ^ (h >> xp.uint32(15))
    return (h * xp.uint32(0x2C1B3C6D)) >> xp.uint32(32 - bits)


def ngram_match(tokens: jax.Array, length: jax.Array, group: NgramGroup):
    """Where the group's patterns occur: ``(hit bool [L], row int32 [L])`` (row valid where hit).

    One hash-table lookup and ``n`` verifying compares per position, instead of comparing every
    pattern at every position (``R`` times less work; that search dominated the step on CPU).
    """
    width = tokens.shape[-1]
    n = group.patterns.shape[1]
    bits = int(group.slots.shape[0]).bit_length() - 1
    shifted = [jnp.concatenate([tokens[k:], jnp.full((k,), -1, tokens.dtype)]) if k else tokens for k in range(n)]
    slot = _window_hash([w.astype(jnp.uint32) for w in shifted], group.mult, bits, jnp)
    row = jnp.take(group.slots, slot.astype(jnp.int32))
    safe = jnp.maximum(row, 0)
    hit = (row >= 0) & (jnp.arange(width) + n <= length)
    for k in range(n):
        hit = hit & (shifted[k] == jnp.take(group.patterns[:, k], safe))
    return hit, safe


def ngram_any(tokens: jax.Array, length: jax.Array, ngrams: NgramSet) -> jax.Array:
    """True when any pattern of ``ngrams`` occurs in ``tokens[:length]``."""
    found = jnp.zeros((), bool)
    for group in ngrams.groups:
        found = found | ngram_match(tokens, length, group)[0].any()
    return found


def _build_group(rows: list[list[int]], ids: list[int]) -> NgramGroup:
    pats = np.asarray(rows, np.int64).reshape(len(rows), -1).astype(np.uint32)
    bits = max(4, int(np.ceil(np.log2(4 * len(rows)))))
    rng = np.random.default_rng(0)  # deterministic search for a collision-free multiplier
    while True:
        for _ in range(2000):
            mult = np.uint32(rng.integers(1, 2**31) * 2 + 1)
            slot = _window_hash([pats[:, k] for k in range(pats.shape[1])], mult, bits, np)
            if len(np.unique(slot)) == len(rows):
                table = np.full((1 << bits,), -1, np.int32)
                table[slot.astype(np.int64)] = np.arange(len(rows))
                return NgramGroup(patterns=jnp.asarray(pats.astype(np.int32)), ids=jnp.asarray(ids, jnp.int32),
                                  slots=jnp.asarray(table), mult=jnp.asarray(mult, jnp.uint32))
        bits += 1


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_piece(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as it reads *after* other words (for phrases spliced mid-instruction).

    Byte-level BPE and SentencePiece mark word starts (``Ġword``, ``▁word``), so a phrase tokenized on
    its own can differ from the same phrase inside a sentence; we tokenize it behind a context word
    and drop the context. Word-level tokenizers give the plain encoding.
    """
    ctx = encode(tokenizer, "Note")
    full = encode(tokenizer, "Note " + text)
    if len(full) > len(ctx) and full[: len(ctx)] == ctx:
        return full[len(ctx):]
    return encode(tokenizer, text)


def phrase_variants(tokenizer, phrase: str, cases: bool = True) -> list[list[int]]:
    """Distinct tokenizations of ``phrase`` (alone and mid-sentence; lower/Title/Capitalized/UPPER)."""
    texts = [phrase]
    if cases:
        texts += [phrase.lower(), phrase.title(), phrase[:1].upper() + phrase[1:], phrase.upper()]
    unk = getattr(tokenizer, "unk_token_id", None)
    out: list[list[int]] = []
    for t in dict.fromkeys(texts):
        for ids in (encode(tokenizer, t), encode_piece(tokenizer, t)):
            # A variant with unknown tokens would match any unknown word: leave it out.
            if ids and ids not in out and (unk is None or unk not in ids):
                out.append(ids)
    return out


def build_ngram_set(variants: Sequence[Sequence[Sequence[int]]]) -> NgramSet:
    """NgramSet from ``variants[phrase_id] = [token ids, ...]`` (grouped by length, duplicates dropped)."""
    by_len: dict[int, dict[tuple[int, ...], int]] = {}
    for pid, vs in enumerate(variants):
        for ids in vs:
            if ids:
                by_len.setdefault(len(ids), {}).setdefault(tuple(ids), pid)
    groups = [_build_group([list(r) for r in rows], list(rows.values())) for _, rows in sorted(by_len.items())]
    return NgramSet(groups=tuple(groups))


def pad_rows(rows: Sequence[Sequence[int]], width: int | None = None, pad_id: int = 0):
    """Right-padded ``int32 [N, width]`` buffer and ``int32 [N]`` lengths from token lists."""
    width = max(1, max((len(r) for r in rows), default=1)) if width is None else width
    buf = np.full((len(rows), width), pad_id, np.int32)
    lens = np.zeros((len(rows),), np.int32)
    for i, r in enumerate(rows):
        r = list(r)[:width]
        buf[i, : len(r)] = r
        lens[i] = len(r)
    return buf, lens


@struct.dataclass
class Instruction:
    """One instruction as the env sees it (leading batch axes allowed): buffer, length and features
    computed once per edit (``embedding float32 [D]``, ``distinct`` = number of distinct token ids).

    ``served``: its length in the instructor's (served model's) tokens, -1 where unknown; equal to
    ``length`` when the buffers hold that model's own ids; from the endpoint's ``usage`` when they
    hold the env's byte-level encoding (HTTP roles). None = not tracked (use ``length``)."""

    tokens: jax.Array
    length: jax.Array
    embedding: jax.Array
    distinct: jax.Array
    served: jax.Array | None = None


def distinct_count(tokens: jax.Array, length: jax.Array) -> jax.Array:
    """Number of distinct token ids in ``tokens[:length]`` (``int32 []``)."""
    # Sort (L log L) rather than all-pairs compares (L^2): 2-4x faster at L = 128 on CPU.
    s = jnp.sort(jnp.where(jnp.arange(tokens.shape[-1]) < length, tokens, -1))
    starts = jnp.concatenate([s[:1] >= 0, (s[1:] != s[:-1]) & (s[1:] >= 0)])
    return jnp.sum(starts).astype(jnp.int32)
