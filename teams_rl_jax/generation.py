"""Batched autoregressive generation with a KV cache: one jitted prefill, then an early-exit decode loop.

Prompts are left-padded (so every row's last prompt token sits in the last slot and the new tokens
are written at the same slot for all rows); positions skip the padding, so a row decodes exactly as
it would alone. Rows stop independently at EOS and are padded after it; the loop exits early once
every row is done, checked every :data:`EXIT_CHECK_EVERY` steps (:func:`early_exit_loop`). Sampling
knobs (temperature, top-k, top-p) are traced values, so changing them does not recompile;
``temperature == 0`` is greedy.
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


SAMPLING_MODES = ("greedy", "sample", "filtered", "any")


def sampling_mode(temperature, top_k=None, top_p=None) -> str:
    """The sampling branch for these settings, picked on the host (a static argument of the decode programs):
    ``greedy`` (temperature 0), ``sample`` (no filter), ``filtered`` (top-k or top-p on) or, when a value is
    traced, ``any`` (both computed, picked per row on the device).

    Why not ``lax.cond`` on the device: XLA:GPU's ``ConditionalThunk`` copies the predicate to the host and
    syncs on every execution, so a cond in the decode step would cost a sync per step (see
    :func:`early_exit_loop`). At most one program per mode, and the values stay traced: changing a
    temperature or top-p does not recompile."""
    if any(isinstance(v, jax.core.Tracer) for v in (temperature, top_k, top_p)):
        return "any"
    if float(temperature) <= 0:
        return "greedy"
    return "filtered" if int(top_k or 0) > 0 or (top_p is not None and float(top_p) < 1.0) else "sample"


def sample_token(key: jax.Array, logits: jax.Array, temperature, top_k, top_p, mode: str = "any") -> jax.Array:
    """Next token ids ``[B]`` from ``logits [B, V]`` in a :func:`sampling_mode` ``mode`` (static): greedy
    (argmax), sampled at ``temperature`` (``filtered``: through top-k / top-p first), or ``any``: greedy
    where ``temperature == 0`` and filtered sampling elsewhere, with no branch (the vocab sort always runs)."""
    if mode not in SAMPLING_MODES:
        raise ValueError(f"sampling mode {mode!r} is not one of {SAMPLING_MODES}")
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if mode == "greedy":
        return greedy
    scaled = logits / jnp.maximum(temperature, 1e-6)
    if mode == "filtered":
        scaled = filter_logits(scaled, top_k, top_p)
    elif mode == "any":
        scaled = jnp.where((top_k > 0) | (top_p < 1.0), filter_logits(scaled, top_k, top_p), scaled)
    drawn = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy) if mode == "any" else drawn


EXIT_CHECK_EVERY = 8


def early_exit_loop(keep_going, body, carry, *, n_steps: int, check_every: int = EXIT_CHECK_EVERY):
    """``carry`` after ``body`` ran ``n_steps`` times, or fewer once ``keep_going(carry)`` is false.

    ``keep_going`` is checked every ``check_every`` steps only, so ``body`` may run up to
    ``check_every - 1`` times after it turned false and must then change nothing that matters (the
    decode bodies mask finished rows). The reason: a ``lax.while_loop`` whose exit depends on data is
    run by XLA:GPU's ``WhileThunk`` with a device-to-host copy of the predicate and a host-device sync
    on *every* iteration, so the host cannot queue step ``i + 1``'s kernels while step ``i`` runs. Here
    the steps run in an inner loop of fixed length, whose trip count XLA knows
    (``known_trip_count``): the runtime queues its iterations back to back, and the sync happens once
    per ``check_every`` steps (docs/design.md, "Decode loop").
    """
    if n_steps <= 0:
        return carry
    K = max(1, min(int(check_every), int(n_steps)))
    n_chunks, rest = divmod(int(n_steps), K)

    def steps(n, c):
        return jax.lax.fori_loop(0, n, lambda _, x: body(x), c)

    def chunk(jc):
        j, c = jc
        return j + 1, steps(K, c)

    _, carry = jax.lax.while_loop(lambda jc: (jc[0] < n_chunks) & keep_going(jc[1]), chunk,
                                  (jnp.int32(0), carry))
    if rest:
        carry = jax.lax.cond(keep_going(carry), lambda c: steps(rest, c), lambda c: c, carry)
    return carry


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


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "mode"))
def _generate(params, input_ids, attention_mask, rng, temperature, top_k, top_p, eos_ids, pad_id, *,
              module: CausalLM, max_new_tokens: int, mode: str = "any"):
    B, T = input_ids.shape
    segments = (attention_mask > 0).astype(jnp.int32)
    lengths = segments.sum(axis=1)
    positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)
    cache = init_cache(module.config, B, T + max_new_tokens, module.dtype)
    logits, _, cache = module.apply({"params": params}, input_ids, segments, positions, cache, 0, True, True)

    def is_eos(tok):
        return jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)

    tok = sample_token(jax.random.fold_in(rng, 0), logits[:, -1], temperature, top_k, top_p, mode)
    out = jnp.full((B, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    done = is_eos(tok)
    ones = jnp.ones((B, 1), jnp.int32)

    def keep_going(carry):
        return ~jnp.all(carry[4])

    L, unroll = module.config.num_hidden_layers, module.config.scan_unroll
    # Only unrolled layers take static slices that XLA can fold; a rolled scan dynamic-slices the stack.
    layers = unstack_layers(params, L) if unroll <= 0 or unroll >= L else None

    def body(carry):
        i, tok, cache, out, done = carry
        # Feed token i-1 (slot T+i-1), sample token i.
        step_params = params if layers is None else restack_layers(params, layers)
        logits, _, cache = module.apply({"params": step_params}, tok[:, None], ones, (lengths + i - 1)[:, None],
                                        cache, T + i - 1)
        nxt = sample_token(jax.random.fold_in(rng, i), logits[:, -1], temperature, top_k, top_p, mode)
        nxt = jnp.where(done, pad_id, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        return i + 1, nxt, cache, out, done | is_eos(nxt)

    carry = (jnp.int32(1), tok, cache, out, done)
    *_, out, _ = early_exit_loop(keep_going, body, carry, n_steps=max_new_tokens - 1)
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
        mode=sampling_mode(temperature, top_k, top_p),
    )
