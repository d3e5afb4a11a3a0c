"""Batched autoregressive generation with a KV cache: one jitted prefill, then a ``lax.while_loop`` decode.

Prompts are left-padded (so every row's last prompt token sits in the last slot and the new tokens
are written at the same slot for all rows); positions skip the padding, so a row decodes exactly as
it would alone. Rows stop independently at EOS and are padded after it; the loop exits early once
every row is done. Sampling knobs (temperature, top-k, top-p) are traced values, so changing them
does not recompile; ``temperature == 0`` is greedy.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from teams_rl_jax.models.llama import CausalLM, init_cache


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Mask (to -inf) logits outside the top-k set and outside the top-p nucleus.

    ``top_k <= 0`` and ``top_p >= 1`` disable the respective filter. At least one token is kept.
    """
    V = logits.shape[-1]
    sorted_desc = jnp.sort(logits, axis=-1)[..., ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take_along_axis(sorted_desc, jnp.broadcast_to(k - 1, logits.shape[:-1])[..., None], axis=-1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    # Nucleus: keep the smallest prefix of the sorted distribution whose mass reaches top_p.
    sorted_desc = jnp.where(sorted_desc < kth, -jnp.inf, sorted_desc)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = (mass_before < top_p) | (jnp.arange(V) == 0)
    cutoff = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def sample_token(key: jax.Array, logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Next token ids ``[B]`` from ``logits [B, V]``: greedy if ``temperature == 0`` else filtered sampling."""
    def sample(logits):
        scaled = logits / jnp.maximum(temperature, 1e-6)
        # The vocab sort behind the filters is the costliest op of a small decode step: skip it if unused.
        scaled = jax.lax.cond((top_k > 0) | (top_p < 1.0), lambda x: filter_logits(x, top_k, top_p), lambda x: x,
                              scaled)
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)

    def greedy(logits):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sample, greedy, logits)


def unstack_layers(params, num_layers: int) -> list:
    """Each layer's weights, sliced once from the stacked ``params["layers"]`` (``[L, ...]`` leaves)."""
    return [jax.tree_util.tree_map(lambda x, i=i: x[i], params["layers"]) for i in range(num_layers)]


def restack_layers(params, layers: list):
    """``params`` with ``layers`` stacked back. Inside the decode loop this is free: XLA folds the model's
    per-layer ``slice(concatenate(w_0 .. w_L))`` to ``w_i``, so the loop body reads the slices taken once
    before the loop. Without it every decode step copied every layer's weights out of the stacked
    arrays (one weight-sized copy per step, ~30% of a CPU decode step; docs/benchmarks.md)."""
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
    return {**params, "layers": stacked}


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens"))
def _generate(params, input_ids, attention_mask, rng, temperature, top_k, top_p, eos_ids, pad_id, *,
              module: CausalLM, max_new_tokens: int):
    B, T = input_ids.shape
    segments = (attention_mask > 0).astype(jnp.int32)
    lengths = segments.sum(axis=1)
    positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)
    cache = init_cache(module.config, B, T + max_new_tokens, module.dtype)
    logits, _, cache = module.apply({"params": params}, input_ids, segments, positions, cache, 0, True, True)

    def is_eos(tok):
        return jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)

    tok = sample_token(jax.random.fold_in(rng, 0), logits[:, -1], temperature, top_k, top_p)
    out = jnp.full((B, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    done = is_eos(tok)
    ones = jnp.ones((B, 1), jnp.int32)

    def cond(carry):
        i, _, _, _, done = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    L, unroll = module.config.num_hidden_layers, module.config.scan_unroll
    # Only unrolled layers take static slices that XLA can fold; a rolled scan dynamic-slices the stack.
    layers = unstack_layers(params, L) if unroll <= 0 or unroll >= L else None

    def body(carry):
        i, tok, cache, out, done = carry
        # Feed token i-1 (slot T+i-1), sample token i.
        step_params = params if layers is None else restack_layers(params, layers)
        logits, _, cache = module.apply({"params": step_params}, tok[:, None], ones, (lengths + i - 1)[:, None],
                                        cache, T + i - 1)
        nxt = sample_token(jax.random.fold_in(rng, i), logits[:, -1], temperature, top_k, top_p)
        nxt = jnp.where(done, pad_id, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        return i + 1, nxt, cache, out, done | is_eos(nxt)

    carry = (jnp.int32(1), tok, cache, out, done)
    *_, out, _ = jax.lax.while_loop(cond, body, carry)
    return out


def generate(lm, params, input_ids, attention_mask, *, max_new_tokens: int, rng: jax.Array,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0) -> jax.Array:
    """Generate ``max_new_tokens`` per row; returns ``int32 [B, max_new_tokens]``.

    Args:
      lm: a ``models.LM`` (its config/dtypes; weights come from ``params``).
      input_ids, attention_mask: ``[B, T]`` left-padded prompts (mask 1 on tokens, 0 on padding).
      rng: PRNG key (used only when ``temperature > 0``).
      temperature: 0 = greedy; otherwise logits are divided by it before sampling.
      top_k / top_p: optional top-k and nucleus filters.
      eos_token_id: int or ids that end a row; everything after it is ``pad_token_id``.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    eos_ids = jnp.asarray(eos or [-1], jnp.int32)
    return _generate(
        params,
        jnp.asarray(input_ids, jnp.int32),
        jnp.asarray(attention_mask, jnp.int32),
        rng,
        jnp.float32(temperature),
        jnp.int32(top_k or 0),
        jnp.float32(1.0 if top_p is None else top_p),
        eos_ids,
        jnp.int32(pad_token_id),
        module=lm.module,
        max_new_tokens=int(max_new_tokens),
    )
