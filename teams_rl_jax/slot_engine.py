"""Continuous batching, the device side: a slot-based KV cache and two jitted programs over it.

``generation.generate`` runs a fixed batch from prefill to the last row's end; a row that finishes
early idles until the longest one is done, and nothing new can join. Here the batch is ``S`` *slots*
that live across calls: each slot holds one request's KV cache in its own row of the cache, with its
own write column, position, step count, limit and sampling settings. Two programs act on the state:

* :func:`insert` prefills ``k`` new prompts (left-padded to a bucket ``Tb``) in one batched forward,
  samples each one's first token, and writes the prompts' KV into free slots (columns ``[0, Tb)``;
  the rest of the row is masked out by segment id 0, so a slot's previous occupant is invisible);
* :func:`decode` runs up to ``n_steps`` decode steps for every slot (each row writes its own column,
  ``CausalLM`` with a ``[S]`` ``cache_index``), stopping early (checked every
  ``generation.EXIT_CHECK_EVERY`` steps) when every slot is done. Attention reads
  only the first ``W`` columns of the cache (``W`` static: the host picks the smallest bucket that
  covers every live row), so a short request does not pay for the cache length a long one needs.

Between calls the host (``backends.continuous.ContinuousEngine``) returns finished requests and admits
waiting ones into the freed slots. A row decodes exactly as it would alone: its positions are its own,
its keys are its own columns, and sampling uses a per-request key folded with the row's own step, so
neither greedy nor sampled output depends on the neighbours (up to float summation order).

Compiled programs are bounded: ``decode`` per (``n_steps``, ``W``) bucket pair and ``insert`` per
(``k``, ``Tb``) bucket pair, all powers of two, for one cache length ``M`` (the cache grows by powers
of two when a request needs more: :func:`grow`). The weights are a jit argument, never a constant.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from teams_rl_jax.generation import early_exit_loop, filter_logits, restack_layers, unstack_layers
from teams_rl_jax.models.llama import CausalLM, init_cache


def init_state(module: CausalLM, slots: int, cache_len: int) -> dict:
    """Empty state: every slot done (free). ``keys`` are raw PRNG key data ``[S, 2]`` (threefry)."""
    S = int(slots)
    return {
        "cache": init_cache(module.config, S, int(cache_len), module.dtype),
        "ptr": jnp.zeros((S,), jnp.int32),       # next cache column this slot writes
        "pos": jnp.zeros((S,), jnp.int32),       # position id of the token fed next
        "tok": jnp.zeros((S,), jnp.int32),       # last sampled token (fed next)
        "step": jnp.zeros((S,), jnp.int32),      # tokens generated so far
        "limit": jnp.ones((S,), jnp.int32),      # max_new_tokens of the slot's request
        "done": jnp.ones((S,), bool),
        "temperature": jnp.zeros((S,), jnp.float32),
        "top_p": jnp.ones((S,), jnp.float32),
        "keys": jnp.zeros((S, 2), jnp.uint32),
    }


def grow(state: dict, cache_len: int) -> dict:
    """The state with its cache widened to ``cache_len`` columns (new columns empty)."""
    cache = state["cache"]
    extra = int(cache_len) - cache["segment_ids"].shape[1]
    if extra <= 0:
        return state
    pad5 = [(0, 0)] * 3 + [(0, extra), (0, 0)]
    cache = {"k": jnp.pad(cache["k"], pad5), "v": jnp.pad(cache["v"], pad5),
             "segment_ids": jnp.pad(cache["segment_ids"], [(0, 0), (0, extra)])}
    return {**state, "cache": cache}


def _sample(logits, keys, step, temperature, top_p, mode=None):
    """One token per row: greedy where ``temperature == 0``, else sampling (through the row's top-p where it
    is < 1) with the row's key folded with its own step (so a row's samples do not depend on the other rows).

    ``mode`` (static, :func:`generation.sampling_mode` of the live rows): ``greedy`` computes no sample,
    ``sample`` no filter, ``filtered`` both; the decode loop takes it from the host, since a ``lax.cond``
    there would sync the host on every step (XLA:GPU's ``ConditionalThunk``). ``None`` (``insert``, once per
    admission, whose result the host reads at once anyway) picks on the device with conds."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if mode == "greedy":
        return greedy

    def nucleus(x):  # only the rows whose top_p < 1: a row's draw never depends on its neighbours' settings
        return jnp.where(top_p[:, None] < 1.0, filter_logits(x, jnp.int32(0), top_p[:, None]), x)

    def sampled(_):
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        if mode == "filtered":
            scaled = nucleus(scaled)
        elif mode is None:
            scaled = jax.lax.cond(jnp.any(top_p < 1.0), nucleus, lambda x: x, scaled)
        ks = jax.vmap(lambda k, s: jax.random.fold_in(jax.random.wrap_key_data(k), s))(keys, step)
        return jax.vmap(jax.random.categorical)(ks, scaled).astype(jnp.int32)

    if mode is None:
        drawn = jax.lax.cond(jnp.any(temperature > 0), sampled, lambda _: greedy, None)
    elif mode in ("sample", "filtered"):
        drawn = sampled(None)
    else:
        raise ValueError(f"slot_engine sampling mode {mode!r}: greedy, sample or filtered")
    return jnp.where(temperature > 0, drawn, greedy)


def _is_eos(tok, eos_ids):
    return jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)


@functools.partial(jax.jit, static_argnames=("module",), donate_argnames=("state",))
def insert(params, state, input_ids, attention_mask, slots, limits, temperature, top_p, keys, eos_ids, *,
           module: CausalLM):
    """Prefill ``input_ids [k, Tb]`` (left-padded) into ``slots [k]`` (index ``S`` = a filler row, dropped).

    Returns ``(state, first [k])``: the first generated token of each new request. A request whose first
    token is EOS or whose limit is 1 is done at once.
    """
    k, Tb = input_ids.shape
    segments = (attention_mask > 0).astype(jnp.int32)
    lengths = segments.sum(axis=1)
    positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)
    small = init_cache(module.config, k, Tb, module.dtype)
    logits, _, small = module.apply({"params": params}, input_ids, segments, positions, small, 0, True, True)
    first = _sample(logits[:, -1], keys, jnp.zeros((k,), jnp.int32), temperature, top_p)

    cache = state["cache"]
    M = cache["segment_ids"].shape[1]
    seg_row = jnp.zeros((k, M), jnp.int32).at[:, :Tb].set(segments)
    new_cache = {
        "k": cache["k"].at[:, slots, :, :Tb, :].set(small["k"], mode="drop"),
        "v": cache["v"].at[:, slots, :, :Tb, :].set(small["v"], mode="drop"),
        "segment_ids": cache["segment_ids"].at[slots].set(seg_row, mode="drop"),
    }

    def put(name, value):
        return state[name].at[slots].set(value, mode="drop")

    state = {
        "cache": new_cache,
        "ptr": put("ptr", jnp.full((k,), Tb, jnp.int32)),
        "pos": put("pos", lengths),
        "tok": put("tok", first),
        "step": put("step", jnp.ones((k,), jnp.int32)),
        "limit": put("limit", limits),
        "done": put("done", _is_eos(first, eos_ids) | (limits <= 1)),
        "temperature": put("temperature", temperature),
        "top_p": put("top_p", top_p),
        "keys": put("keys", keys),
    }
    return state, first


@functools.partial(jax.jit, static_argnames=("module", "n_steps", "window", "mode"), donate_argnames=("state",))
def decode(params, state, evict, eos_ids, pad_id, *, module: CausalLM, n_steps: int, window: int,
           mode: str = "filtered"):
    """Up to ``n_steps`` decode steps for every live slot over the cache's first ``window`` columns,
    sampling in ``mode`` (:func:`_sample`; ``filtered`` serves every row, the host picks the cheapest).

    ``evict [S]`` marks slots the host ended (a stop string) before the steps. Returns
    ``(state, tokens [S, n_steps])``: each row's new tokens, ``pad_id`` where the row was done.
    """
    S = state["ptr"].shape[0]
    cache = state["cache"]
    win = {"k": cache["k"][:, :, :, :window], "v": cache["v"][:, :, :, :window],
           "segment_ids": cache["segment_ids"][:, :window]}
    out = jnp.full((S, n_steps), pad_id, jnp.int32)
    carry0 = (jnp.int32(0), win, state["ptr"], state["pos"], state["tok"], state["step"], state["done"] | evict, out)

    def keep_going(c):
        return ~jnp.all(c[6])

    L, unroll = module.config.num_hidden_layers, module.config.scan_unroll
    layers = unstack_layers(params, L) if unroll <= 0 or unroll >= L else None  # see generation.restack_layers

    def body(c):
        i, win, ptr, pos, tok, step, done, out = c
        live = ~done
        # Done rows write nothing (column ``window`` is out of range: the scatter drops it).
        col = jnp.where(live, ptr, window)
        step_params = params if layers is None else restack_layers(params, layers)
        logits, _, win = module.apply({"params": step_params}, tok[:, None], live.astype(jnp.int32)[:, None],
                                      pos[:, None], win, col)
        nxt = _sample(logits[:, -1], state["keys"], step, state["temperature"], state["top_p"], mode)
        nxt = jnp.where(live, nxt, pad_id)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        inc = live.astype(jnp.int32)
        step = step + inc
        done = done | (live & (_is_eos(nxt, eos_ids) | (step >= state["limit"])))
        return i + 1, win, ptr + inc, pos + inc, jnp.where(live, nxt, tok), step, done, out

    _, win, ptr, pos, tok, step, done, out = early_exit_loop(keep_going, body, carry0, n_steps=n_steps)
    new_cache = {"k": jax.lax.dynamic_update_slice(cache["k"], win["k"], (0, 0, 0, 0, 0)),
                 "v": jax.lax.dynamic_update_slice(cache["v"], win["v"], (0, 0, 0, 0, 0)),
                 "segment_ids": jax.lax.dynamic_update_slice(cache["segment_ids"], win["segment_ids"], (0, 0))}
    return {**state, "cache": new_cache, "ptr": ptr, "pos": pos, "tok": tok, "step": step, "done": done}, out
