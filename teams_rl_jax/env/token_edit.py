"""The token-edit operator: LLM-free, pure-jnp rewrites of instruction buffers (0 queries).

Same interface as ``LLMOperator``: ``apply(key, op_ids [B], tokens [B, L], lengths [B], params,
context=None) -> (tokens [B, L], lengths [B], queries [B] = 0)``. Each operation is an edit *kind*
applied with the operation's own phrase bank (``env.operations``):

* ``append``: add a clause drawn from the bank at the end (add_constraints: a constraint;
  deepening: a request for depth; increase_reasoning_steps: a step-by-step request;
  complicate_input: a table or JSON input block).
* ``swap``: replace one generic term of ``phrases.CONCRETE_TERMS`` found in the instruction by one of
  its specific replacements (concretizing); with no generic term left, append a clause from the bank.
* ``recombine``: a new instruction = a breadth frame from the bank + another seed of the same
  domain (breadth: a rarer prompt in the same domain).

An edit whose result would not fit the buffer is not applied (the instruction stays as it was, which
the ``no_gain`` elimination rule then penalises). Phrase banks are tokenized once in
:func:`build_token_edit`. Under ``vmap`` all kinds are computed and one is selected per row, so the
per-row cost is that of the three kinds, not of six operations.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable, Sequence

import flax.struct as struct
import jax
import jax.numpy as jnp
import numpy as np

from teams_rl_jax.env import phrases
from teams_rl_jax.env.buffers import NgramSet, build_ngram_set, encode_piece, ngram_match, pad_rows, splice
from teams_rl_jax.env.operations import OPERATION_REGISTRY
from teams_rl_jax.env.registry import Registry
from teams_rl_jax.env.seeds import SeedBatch
from teams_rl_jax.errors import ConfigError


@struct.dataclass
class TokenEditParams:
    """Tokenized phrase banks and tables (all traced arrays).

    ``phrases [R, K]``/``phrase_len [R]``: every bank phrase, then every concretizing replacement.
    Action ``a`` draws bank rows ``op_offset[a] .. op_offset[a] + op_count[a] - 1``; ``op_kind [A]``
    indexes the operator's ``kinds``. ``generic``: n-grams of the generic terms (ids = term ``g``),
    with ``generic_id``/``generic_len`` per pattern row (rows numbered group by group); term ``g``'s
    replacements are phrase rows ``spec_offset[g] ..`` (``spec_count[g]`` of them). ``pool``: the seeds
    breadth draws from; ``members [Dm, M]``/``member_count [Dm]``: pool indices of each domain;
    ``rank [N]``: a seed's position in its domain's member list.
    """

    phrases: jax.Array
    phrase_len: jax.Array
    op_offset: jax.Array
    op_count: jax.Array
    op_kind: jax.Array
    generic: NgramSet
    generic_id: jax.Array
    generic_len: jax.Array
    spec_offset: jax.Array
    spec_count: jax.Array
    pool: SeedBatch
    members: jax.Array
    member_count: jax.Array
    rank: jax.Array


@struct.dataclass
class SplicePlan:
    """What an edit does, as one splice: start from the current instruction (``base = -1``) or pool
    seed ``base``, replace ``cut`` tokens at ``pos`` by phrase row ``row``."""

    base: jax.Array
    pos: jax.Array
    cut: jax.Array
    row: jax.Array


# An edit kind: (rand uint32 [NUM_RANDOM], op, tokens [L], length, params, context) -> SplicePlan.
# Kinds only decide *what* to splice (a few scalars); the operator does the one splice for the
# selected kind, so a row pays for one splice whatever the number of kinds (gathers are slow on CPU).
EditFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, TokenEditParams, dict], SplicePlan]
NUM_RANDOM = 4  # random uint32 words an edit kind may use (rand[0..3])


def _below(r: jax.Array, n: jax.Array) -> jax.Array:
    """Integer in ``[0, n)`` from random bits ``r`` (modulo bias < n / 2**32, negligible here)."""
    return (r % jnp.maximum(n, 1).astype(jnp.uint32)).astype(jnp.int32)


def _i32(x) -> jax.Array:
    return jnp.asarray(x, jnp.int32)


def _append_plan(r, op, length, p: TokenEditParams) -> SplicePlan:
    row = p.op_offset[op] + _below(r, p.op_count[op])
    return SplicePlan(base=_i32(-1), pos=_i32(length), cut=_i32(0), row=_i32(row))


def edit_append(rand, op, tokens, length, p: TokenEditParams, ctx: dict) -> SplicePlan:
    """Append a clause drawn from the operation's bank."""
    return _append_plan(rand[0], op, length, p)


def edit_swap(rand, op, tokens, length, p: TokenEditParams, ctx: dict) -> SplicePlan:
    """Swap a generic term for a specific one; append a bank clause when no generic term is present."""
    fallback = _append_plan(rand[2], op, length, p)
    rows = p.generic.num_rows
    if rows == 0:  # no generic term is expressible in this vocabulary
        return fallback
    width = tokens.shape[-1]
    # Where generic terms start (the first group's row wins if two start at one position) ...
    any_hit, row_at, row0 = jnp.zeros((width,), bool), jnp.zeros((width,), jnp.int32), 0
    for group in p.generic.groups:
        hit, row = ngram_match(tokens, length, group)
        row_at = jnp.where(hit & ~any_hit, row0 + row, row_at)
        any_hit = any_hit | hit
        row0 += group.patterns.shape[0]
    # ... then one of them uniformly: the k-th hit, k drawn below the number of hits.
    count = jnp.sum(any_hit)
    chosen = any_hit & (jnp.cumsum(any_hit) - 1 == _below(rand[0], count))
    pos = jnp.sum(jnp.where(chosen, jnp.arange(width), 0)).astype(jnp.int32)
    prow = jnp.sum(jnp.where(chosen, row_at, 0)).astype(jnp.int32)
    found = count > 0
    g = p.generic_id[prow]
    swap = SplicePlan(base=_i32(-1), pos=pos, cut=p.generic_len[prow],
                      row=p.spec_offset[g] + _below(rand[1], p.spec_count[g]))
    return jax.tree.map(lambda a, b: jnp.where(found, a, b), swap, fallback)


def edit_recombine(rand, op, tokens, length, p: TokenEditParams, ctx: dict) -> SplicePlan:
    """Frame from the bank + another pool seed of the same domain (any other seed if the domain is unknown)."""
    n = p.pool.tokens.shape[0]
    domain = ctx.get("domain", _i32(-1))
    seed = ctx.get("seed", _i32(-1))
    known = (domain >= 0) & (domain < p.members.shape[0])
    d = jnp.clip(domain, 0, p.members.shape[0] - 1)
    size = jnp.where(known, p.member_count[d], 0)
    own = known & (seed >= 0) & (seed < n)
    others = size - own.astype(jnp.int32)
    r = _below(rand[0], others)
    # Skip the current seed's own slot in its domain list (rank) when it is in the pool.
    r_skip = r + (own & (r >= p.rank[jnp.clip(seed, 0, n - 1)])).astype(jnp.int32)
    in_domain = p.members[d, jnp.clip(r_skip, 0, p.members.shape[1] - 1)]
    j = jnp.where(others > 0, in_domain, _below(rand[1], n))
    frame = _append_plan(rand[2], op, length, p)
    return frame.replace(base=_i32(j), pos=_i32(0))


EDIT_KINDS: Registry[EditFn] = Registry("edit kind")
EDIT_KINDS.register("append", edit_append)
EDIT_KINDS.register("swap", edit_swap)
EDIT_KINDS.register("recombine", edit_recombine)


@dataclasses.dataclass(frozen=True, eq=False)
class TokenEditOperator:
    """Pure-jnp operator over right-padded buffers ``[B, max_len]``; ``kinds[i]`` is edit kind ``i``."""

    max_len: int
    kinds: tuple[str, ...]
    pad_id: int = 0
    wants_context = True  # the env passes {"domain", "seed"} per row (for same-domain breadth)

    def apply(self, key: jax.Array, op_ids: jax.Array, tokens: jax.Array, lengths: jax.Array,
              params: TokenEditParams, context: dict[str, jax.Array] | None = None):
        """Edit each row with its operation: ``(tokens [B, L], lengths [B], queries [B] = 0)``."""
        B = op_ids.shape[0]
        context = context or {}
        # One threefry call for all random draws (XLA:CPU runs each call as a small loop); kinds
        # may share words since only one kind's plan is kept per row.
        rand = jax.random.bits(key, (B, NUM_RANDOM), jnp.uint32)
        new_t, new_n = jax.vmap(partial(self._one, params))(rand, op_ids.astype(jnp.int32), tokens, lengths, context)
        return new_t, new_n, jnp.zeros((B,), jnp.float32)

    def _one(self, params: TokenEditParams, rand, op, tokens, length, ctx):
        plans = [EDIT_KINDS.get(kind)(rand, op, tokens, length, params, ctx) for kind in self.kinds]
        kind = params.op_kind[op]
        plan = plans[0]
        for i, other in enumerate(plans[1:], 1):
            plan = jax.tree.map(lambda a, b, i=i: jnp.where(kind == i, b, a), plan, other)
        pool = params.pool
        from_pool = plan.base >= 0
        base_t = jnp.where(from_pool, pool.tokens[jnp.maximum(plan.base, 0)], tokens)
        base_n = jnp.where(from_pool, pool.lengths[jnp.maximum(plan.base, 0)], length)
        new, new_n, fits = splice(base_t, base_n, plan.pos, plan.cut, params.phrases[plan.row],
                                  params.phrase_len[plan.row], self.pad_id)
        # An edit that does not fit the buffer is not applied.
        return jnp.where(fits, new, tokens), jnp.where(fits, new_n, length)


def build_token_edit(tokenizer, operations: Sequence[str], pool: SeedBatch, max_len: int,
                     banks: dict[str, Sequence[str]] | None = None,
                     concrete_terms: dict[str, Sequence[str]] | None = None) -> tuple[TokenEditOperator, TokenEditParams]:
    """Tokenize the banks for ``operations`` (action order) and build the operator and its params."""
    banks = phrases.BANKS if banks is None else banks
    concrete_terms = phrases.CONCRETE_TERMS if concrete_terms is None else concrete_terms
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    specs = [OPERATION_REGISTRY.get(op) for op in operations]
    kinds = tuple(dict.fromkeys(s.kind for s in specs))
    for k in kinds:
        EDIT_KINDS.get(k)
    rows, offsets, counts = [], [], []
    for s in specs:
        if s.bank not in banks or not banks[s.bank]:
            raise ConfigError(f"operation {s.name!r}: no phrases in bank {s.bank!r}")
        offsets.append(len(rows))
        texts = banks[s.bank]
        rows += [encode_piece(tokenizer, t) for t in texts]
        counts.append(len(texts))
    generics, spec_offset, spec_count = [], [], []
    unk = getattr(tokenizer, "unk_token_id", None)
    for generic, specifics in concrete_terms.items():
        ids = encode_piece(tokenizer, generic)
        generics.append([ids] if ids and (unk is None or unk not in ids) else [])
        spec_offset.append(len(rows))
        rows += [encode_piece(tokenizer, s) for s in specifics]
        spec_count.append(len(specifics))
    generic = build_ngram_set(generics)
    generic_id = np.concatenate([np.asarray(g.ids) for g in generic.groups] or [np.zeros(1, np.int32)])
    generic_len = np.concatenate([np.full(g.patterns.shape[0], g.patterns.shape[1]) for g in generic.groups]
                                 or [np.zeros(1, np.int32)])
    for i, r in enumerate(rows):  # rows longer than max_len are allowed: they never fit, so never apply
        if not r:
            raise ConfigError(f"phrase row {i} tokenizes to no tokens")
    table, table_len = pad_rows(rows, pad_id=pad)
    if pool.tokens.shape[-1] != max_len:
        raise ConfigError(f"breadth pool is {pool.tokens.shape[-1]} tokens wide, expected max_len {max_len}")
    members, member_count, rank = _domain_members(np.asarray(pool.domains))
    params = TokenEditParams(
        phrases=jnp.asarray(table), phrase_len=jnp.asarray(table_len), op_offset=jnp.asarray(offsets, jnp.int32),
        op_count=jnp.asarray(counts, jnp.int32), op_kind=jnp.asarray([kinds.index(s.kind) for s in specs], jnp.int32),
        generic=generic, generic_id=jnp.asarray(generic_id, jnp.int32),
        generic_len=jnp.asarray(generic_len, jnp.int32),
        spec_offset=jnp.asarray(spec_offset, jnp.int32), spec_count=jnp.asarray(spec_count, jnp.int32),
        pool=pool, members=jnp.asarray(members), member_count=jnp.asarray(member_count), rank=jnp.asarray(rank))
    return TokenEditOperator(max_len=max_len, kinds=kinds, pad_id=pad), params


def _domain_members(domains: np.ndarray):
    """Per domain id: pool indices (padded), how many, and each seed's rank in its domain's list."""
    num = int(domains.max()) + 1 if domains.size and domains.max() >= 0 else 1
    lists: list[list[int]] = [[] for _ in range(num)]
    rank = np.zeros(domains.shape, np.int32)
    for i, d in enumerate(domains.tolist()):
        if d >= 0:
            rank[i] = len(lists[d])
            lists[d].append(i)
    width = max(1, max(len(m) for m in lists))
    members = np.zeros((num, width), np.int32)
    for d, m in enumerate(lists):
        members[d, : len(m)] = m
    return members, np.asarray([len(m) for m in lists], np.int32), rank


def operator_context(domain: jax.Array, seed: jax.Array) -> dict[str, Any]:
    """The ``context`` rows the env passes to operators with ``wants_context``."""
    return {"domain": domain, "seed": seed}
