"""Instruction embeddings for the observation and the novelty reward (pluggable).

An embedding function is ``embed_fn(params, tokens int32 [L], length int32 []) -> float32 [D]`` on
one buffer (the env vmaps it). The default, ``"hashed"``, is a fixed random projection of the
instruction's hashed unigram + bigram counts, L2-normalised: by Johnson-Lindenstrauss, dot products
approximate the cosine similarity of the count vectors, so ``1 - cos`` measures how much the wording
changed. It is cheap (a scatter into ``buckets`` counts and one small matmul), tokenizer-agnostic (hashes token ids, any vocab
size) and needs no model. A sentence encoder (``teams_rl_jax.models.load_encoder``) plugs in through
``make(..., embed_fn=..., embed_params=...)``.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct as struct
import jax
import jax.numpy as jnp

from teams_rl_jax.env.registry import Registry

EmbedFn = Callable[[Any, jax.Array, jax.Array], jax.Array]

_MUL1 = 0x9E3779B1  # odd multiplicative-hash constants (golden ratio, Murmur3)
_MUL2 = 0x85EBCA6B
_MUL3 = 0xC2B2AE35


@struct.dataclass
class HashedEmbedParams:
    """Projection table ``float32 [buckets, D]``: row ``h`` is the random direction of hash bucket ``h``."""

    table: jax.Array


def init_hashed(key: jax.Array, buckets: int = 512, dim: int = 64) -> HashedEmbedParams:
    """Gaussian projection table for :func:`hashed_embed`."""
    return HashedEmbedParams(table=jax.random.normal(key, (buckets, dim), jnp.float32))


def _mix(h: jax.Array) -> jax.Array:
    # xor-shift finaliser so that nearby token ids land in unrelated buckets
    h = h ^ (h >> 16)
    h = h * jnp.uint32(_MUL2)
    return h ^ (h >> 13)


def hashed_embed(params: HashedEmbedParams, tokens: jax.Array, length: jax.Array) -> jax.Array:
    """Unit-norm ``float32 [D]`` embedding of ``tokens[:length]`` (zeros for an empty buffer)."""
    width = tokens.shape[-1]
    buckets = params.table.shape[0]
    t = tokens.astype(jnp.uint32) + jnp.uint32(1)
    nxt = jnp.concatenate([t[1:], jnp.zeros((1,), jnp.uint32)])
    uni = _mix(t * jnp.uint32(_MUL1)) % jnp.uint32(buckets)
    bi = _mix(t * jnp.uint32(_MUL1) + nxt * jnp.uint32(_MUL3) + jnp.uint32(0x27D4EB2F)) % jnp.uint32(buckets)
    pos = jnp.arange(width)
    weights = jnp.concatenate([pos < length, pos + 1 < length]).astype(jnp.float32)
    idx = jnp.concatenate([uni, bi]).astype(jnp.int32)
    # Count vector then one matmul: on CPU a scatter into a few hundred buckets plus a (batched)
    # GEMM is an order of magnitude faster than gathering 2L projection rows per instruction.
    counts = jnp.zeros((buckets,), jnp.float32).at[idx].add(weights)
    v = counts @ params.table
    return v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v), 1e-12))


@struct.dataclass
class _Spec:
    init: Callable[..., Any] = struct.field(pytree_node=False)
    apply: EmbedFn = struct.field(pytree_node=False)


EMBEDDINGS: Registry[_Spec] = Registry("embedding")
EMBEDDINGS.register("hashed", _Spec(init=init_hashed, apply=hashed_embed))


def cosine_distance(a: jax.Array, b: jax.Array) -> jax.Array:
    """``1 - cos(a, b)`` over the last axis (0 when either vector is zero)."""
    num = jnp.sum(a * b, axis=-1)
    den = jnp.sqrt(jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1))
    return 1.0 - jnp.where(den > 0, num / jnp.maximum(den, 1e-12), 1.0)
