"""Flax Linen decoder for the Llama family (Llama 1/2/3, Mistral, Qwen2).

RMSNorm, rotary embeddings (default / linear / llama3 scaling), grouped-query attention (the kernel is
chosen by ``models.attention``: cuDNN flash on GPU, Pallas splash on TPU, XLA on CPU; override with
``ModelConfig.attention_impl``), SwiGLU MLP, tied or untied head.

Design choices (and why):
* Layers are one ``nn.scan`` (params stacked on a leading ``layers`` axis): compile time is
  independent of depth, which matters for 32-layer checkpoints and for the test suite.
* Every parameter carries logical axis names (``nn.with_logical_partitioning``); ``sharding.py`` maps
  them to mesh axes. Activations get ``nn.with_logical_constraint``, a no-op without rules.
* The attention mask is built from *segment ids* (0 = padding, k > 0 = segment k): one mechanism
  serves left-padded generation batches and packed SFT rows.
* The KV cache is a plain pytree written at ``cache_index`` with ``dynamic_update_slice``; the cache
  also stores each slot's segment id so padding and empty slots are masked the same way.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from teams_rl_jax.errors import ConfigError
from teams_rl_jax.models import nf4
from teams_rl_jax.models.attention import attention, cache_attention, resolve_impl, segment_mask
from teams_rl_jax.models.config import ModelConfig

Array = jax.Array


def rope_inv_freq(config: ModelConfig) -> jnp.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` (float32) with the config's RoPE scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    rope = config.rope_dict()
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / rope["factor"]
    elif kind == "llama3":
        factor = rope["factor"]
        low, high = rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = jnp.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(config: ModelConfig, positions: Array) -> tuple[Array, Array]:
    """cos/sin tables ``[B, T, head_dim]`` (float32) for integer ``positions [B, T]``."""
    freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(config)
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # HF's non-interleaved (rotate_half) layout
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate ``x [B, T, N, Dh]`` by the tables ``[B, T, Dh]`` (computed in float32)."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def attention_mask(q_segments: Array, k_segments: Array, q_slots: Array, k_slots: Array,
                   window: int | None = None) -> Array:
    """Boolean mask ``[B, 1, T, S]``: same non-zero segment, causal in slot order, optional window."""
    return segment_mask(q_segments, k_segments, q_slots, k_slots, window)


class RMSNorm(nn.Module):
    """Root-mean-square norm, statistics in float32 (as HF's LlamaRMSNorm)."""

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (scale.astype(self.dtype) * x32.astype(self.dtype)).astype(self.dtype)


class LoRADense(nn.Dense):
    """``nn.Dense`` plus a low-rank update (Hu et al. 2021): ``y = x W + b + (alpha / r) * dropout(x) A B``.

    The base keeps nn.Dense's ``params`` names (``kernel``, ``bias``), so checkpoints load unchanged; ``A [in, r]``
    and ``B [r, out]`` live in the separate ``"lora"`` collection, float32 whatever the base dtype (as PEFT's
    default ``autocast_adapter_dtype``), B = 0 so a fresh adapter leaves the model unchanged, A as PEFT's
    ``kaiming_uniform_(a=sqrt(5))``. Differentiating only that collection gives the frozen base no gradient.
    ``lora``: anything with ``rank``, ``alpha``, ``dropout`` (see ``sft.config.LoraSection``); dropout draws
    from the ``"dropout"`` rng stream.

    QLoRA (``lora.quantize == "nf4"``): the frozen ``kernel`` is replaced by ``kernel_nf4`` (uint8 codes,
    ``[in/2, out]``) and ``kernel_absmax`` (``[in/block, out]``), see ``models.nf4``; ``sft.lora.quantize_base``
    converts a loaded base. ``adapt=False`` is such a quantized layer without an adapter (a projection outside
    ``lora.targets``: QLoRA quantizes every linear layer of the blocks).
    """

    lora: Any = None
    lora_axes: tuple = (None, None)
    adapt: bool = True

    @nn.compact
    def __call__(self, x):
        spec, (ax_in, ax_out) = self.lora, self.lora_axes
        y = self._quantized(x) if getattr(spec, "quantize", "none") == "nf4" else super().__call__(x)
        if not self.adapt:
            return y
        init_a = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # U(+-1/sqrt(in)), as PEFT
        rng = self.make_rng("params") if self.is_initializing() else None
        a = self.variable("lora", "lora_a", nn.with_logical_partitioning(init_a, (ax_in, "lora_rank")), rng,
                          (x.shape[-1], spec.rank), jnp.float32)
        b = self.variable("lora", "lora_b", nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank", ax_out)),
                          rng, (spec.rank, self.features), jnp.float32)
        if spec.dropout > 0:
            x = nn.Dropout(spec.dropout, deterministic=False)(x)
        delta = (x.astype(y.dtype) @ a.value.astype(y.dtype)) @ b.value.astype(y.dtype)
        return y + (delta * (spec.alpha / spec.rank)).astype(y.dtype)

    def _quantized(self, x):
        """``x W + b`` with ``W`` from its NF4 codes (frozen; the backward recomputes ``W``, see ``nf4.matmul``)."""
        block = self.lora.quant_block
        codes_shape, absmax_shape = nf4.quantized_shapes((x.shape[-1], self.features), block)
        # The initialisers only give abstract shapes (eval_shape, sharding); real values come from
        # sft.lora.quantize_base.
        codes = self.param("kernel_nf4", nn.with_logical_partitioning(
            lambda _, s: jnp.zeros(s, jnp.uint8), self.lora_axes), codes_shape)
        absmax = self.param("kernel_absmax", nn.with_logical_partitioning(
            lambda _, s: jnp.ones(s, jnp.float32), self.lora_axes), absmax_shape)
        x = x.astype(self.dtype) if self.dtype is not None else x
        y = nf4.matmul(x, codes, absmax)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(y.dtype)
        return y


def _dense(features: int, axes: tuple[str, str], use_bias: bool, cfg: ModelConfig, dtype, param_dtype, name: str,
           lora=None):
    init = nn.initializers.normal(cfg.initializer_range)
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
              kernel_init=nn.with_logical_partitioning(init, axes),
              bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)), name=name)
    if lora is not None and name in lora.targets:  # LoRA SFT: this projection gets an adapter
        return LoRADense(features, lora=lora, lora_axes=axes, **kw)
    if lora is not None and getattr(lora, "quantize", "none") == "nf4":  # QLoRA: frozen 4-bit, no adapter
        return LoRADense(features, lora=lora, lora_axes=axes, adapt=False, **kw)
    return nn.Dense(features, **kw)


def tokens_2d(x: Array) -> Array:
    """``[..., D]`` -> ``[tokens, D]`` (a free reshape): projections run as plain 2-D matmuls.

    Why: ``nn.Dense`` on ``[B, T, D]`` is a dot with two free dims, and its weight gradient contracts
    over both (B and T). XLA:CPU lowers that with a transposed copy of the activation gradient per
    projection; on the 2-D view it is one plain GEMM. Measured on the SwiGLU block (4096 tokens,
    512 -> 1344, float32, 2-core CPU): forward + backward 659 -> 468 ms (torch: 374 ms).
    Row-major merging keeps a batch-sharded leading axis sharded, so meshes are unaffected.
    """
    return x.reshape(-1, x.shape[-1])


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional KV cache."""

    config: ModelConfig
    dtype: Any
    param_dtype: Any
    lora: Any = None  # LoRA spec: adapters on the projections named in lora.targets

    @nn.compact
    def __call__(self, x, cos, sin, masks, is_sliding, kv_cache, layer, cache_index, prefill=False):
        cfg = self.config
        B, T, _ = x.shape
        H, K, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        x = tokens_2d(x)  # projections as plain [B*T, D] matmuls (see tokens_2d)
        q = _dense(H * Dh, ("embed", "heads"), qkv_bias, cfg, self.dtype, self.param_dtype, "q_proj", self.lora)(x)
        k = _dense(K * Dh, ("embed", "kv_heads"), qkv_bias, cfg, self.dtype, self.param_dtype, "k_proj", self.lora)(x)
        v = _dense(K * Dh, ("embed", "kv_heads"), qkv_bias, cfg, self.dtype, self.param_dtype, "v_proj", self.lora)(x)
        q = apply_rope(q.reshape(B, T, H, Dh), cos, sin)
        k = apply_rope(k.reshape(B, T, K, Dh), cos, sin)
        v = v.reshape(B, T, K, Dh)
        q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", None))
        if kv_cache is not None:
            # The cache is the scan *carry* ([L, B, KVH, S, Dh], head-major) updated at (layer, slot): XLA
            # then writes in place instead of restacking every layer's cache on each decode step. Head-major
            # so a decode step's two attention matmuls read the cache as it lies (batch dims B, KVH leading);
            # slot-major [B, S, KVH, Dh] made XLA transpose-copy every layer's cache on every step.
            def write(buf, new):
                new = new.transpose(0, 2, 1, 3)[None].astype(buf.dtype)  # [1, B, KVH, T, Dh]
                if jnp.ndim(cache_index) == 1:  # one column per row (continuous batching; T == 1)
                    return buf.at[layer, jnp.arange(B), :, cache_index, :].set(new[0, :, :, 0, :], mode="drop")
                return jax.lax.dynamic_update_slice(buf, new, (layer, 0, 0, cache_index, 0))

            kv_cache = {"k": write(kv_cache["k"], k), "v": write(kv_cache["v"], v)}
            if not prefill:  # prefill into an empty cache attends to its own keys only
                k = kv_cache["k"][layer].astype(self.dtype)
                v = kv_cache["v"][layer].astype(self.dtype)
        out = self._attend(q, k, v, masks, is_sliding, self_attention=kv_cache is None or prefill)
        out = out.reshape(B * T, H * Dh)
        out = _dense(cfg.hidden_size, ("heads", "embed"), cfg.attention_bias, cfg, self.dtype, self.param_dtype,
                     "o_proj", self.lora)(out)
        return out.reshape(B, T, cfg.hidden_size), kv_cache

    def _attend(self, q, k, v, masks, is_sliding, self_attention):
        cfg = self.config
        impl = resolve_impl(cfg.attention_impl, self.dtype, cfg.head_dim)
        full_mask, window_mask, q_seg, k_seg = masks
        if not self_attention:  # a decode step: k, v are this layer's head-major cache [B, KVH, S, Dh]
            mask, sliding = full_mask, cfg.layer_is_sliding()
            if window_mask is not None and all(sliding):
                mask = window_mask
            elif window_mask is not None and any(sliding):  # Qwen2 max_window_layers: per-layer choice
                mask = jnp.where(is_sliding, window_mask, full_mask)
            return cache_attention(q, k, v, mask, scale=1.0 / math.sqrt(cfg.head_dim))

        def run(windowed):
            return attention(q, k, v, impl=impl, mask=window_mask if windowed else full_mask, q_segments=q_seg,
                             k_segments=k_seg, window=cfg.sliding_window if windowed else None,
                             self_attention=self_attention)

        if window_mask is None:
            return run(False)
        sliding = cfg.layer_is_sliding()
        if all(sliding) or not any(sliding):  # static: one kernel for every layer
            return run(all(sliding))
        if impl == "xla":  # one masked softmax serves both layer kinds
            mask = jnp.where(is_sliding, window_mask, full_mask)
            return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0 / math.sqrt(cfg.head_dim),
                                                implementation="xla")
        # Mixed layers (Qwen2 max_window_layers): the fused kernels take a static mask, so branch.
        return jax.lax.cond(is_sliding, lambda: run(True), lambda: run(False))


class SwiGLU(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    config: ModelConfig
    dtype: Any
    param_dtype: Any
    lora: Any = None

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        shape = x.shape
        x = tokens_2d(x)
        gate = _dense(cfg.intermediate_size, ("embed", "mlp"), cfg.mlp_bias, cfg, self.dtype, self.param_dtype,
                      "gate_proj", self.lora)(x)
        up = _dense(cfg.intermediate_size, ("embed", "mlp"), cfg.mlp_bias, cfg, self.dtype, self.param_dtype,
                    "up_proj", self.lora)(x)
        h = jax.nn.silu(gate) * up
        h = nn.with_logical_constraint(h.reshape(*shape[:-1], -1),
                                       ("activation_batch", "activation_length", "activation_mlp"))
        out = _dense(cfg.hidden_size, ("mlp", "embed"), cfg.mlp_bias, cfg, self.dtype, self.param_dtype,
                     "down_proj", self.lora)(tokens_2d(h))
        return out.reshape(shape)


class DecoderLayer(nn.Module):
    """One pre-norm decoder block; the scan body (carry = hidden state and the whole KV cache)."""

    config: ModelConfig
    dtype: Any
    param_dtype: Any
    prefill: bool = False
    lora: Any = None

    @nn.compact
    def __call__(self, carry, cos, sin, masks, is_sliding, layer, cache_index):
        h, kv_cache = carry
        cfg = self.config
        x = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="input_layernorm")(h)
        attn, kv_cache = Attention(cfg, self.dtype, self.param_dtype, self.lora, name="self_attn")(
            x, cos, sin, masks, is_sliding, kv_cache, layer, cache_index, self.prefill
        )
        h = h + attn
        x = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="post_attention_layernorm")(h)
        h = h + SwiGLU(cfg, self.dtype, self.param_dtype, self.lora, name="mlp")(x)
        h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_embed"))
        return (h, kv_cache), None


# Rematerialisation policies by name (what the backward pass may keep from the forward of a layer;
# everything else is recomputed). "none" keeps everything (fastest, most memory), "full" keeps only
# the layer inputs (least memory, ~1/3 more FLOPs), the "dots" family keeps matmul outputs and
# recomputes the cheap elementwise ops (norms, RoPE, SwiGLU, softmax) between them.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # short alias (projections, not scores)
    "everything_saveable": jax.checkpoint_policies.everything_saveable,  # remat wrapper only: for tests
}


def remat_policy(name: str):
    """The ``jax.checkpoint`` policy for a remat name; ConfigError naming the key if unknown."""
    if name not in REMAT_POLICIES:
        raise ConfigError(f"model.remat: unknown policy {name!r} (use one of {', '.join(REMAT_POLICIES)})")
    return REMAT_POLICIES[name]


class CausalLM(nn.Module):
    """Decoder-only LM. ``__call__`` returns ``(logits f32 [B,T,V], hidden [B,T,D], new_cache)``.

    Args (call): ``input_ids [B,T]``, ``segment_ids [B,T]`` (0 = pad), ``positions [B,T]``,
    optional ``cache`` (from :func:`init_cache`) and ``cache_index`` (slot of the first new token: a
    scalar, or ``[B]`` for a one-token decode step where each row writes its own column);
    ``last_only`` computes logits (and returns hidden) for the last position only; ``prefill`` declares
    that the cache is empty before ``cache_index == 0``, so attention skips the (empty) cache slots;
    ``skip_logits`` returns ``(None, hidden, None)`` without applying the head (the chunked loss does).
    """

    config: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    lora: Any = None  # LoRA spec (rank, alpha, dropout, targets); adapters in the "lora" collection

    @nn.compact
    def __call__(self, input_ids, segment_ids, positions, cache=None, cache_index=None, last_only: bool = False,
                 prefill: bool = False, skip_logits: bool = False):
        cfg = self.config
        B, T = input_ids.shape
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range),
                                                        ("vocab", "embed")),
            name="embed_tokens",
        )
        h = embed(input_ids)
        h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_embed"))
        cos, sin = rope_tables(cfg, positions)

        if prefill and cache is not None:
            index = 0
            new_segments = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids.astype(jnp.int32), (0, 0))
            slots = jnp.arange(T)
            q_slots, k_slots, k_segments = slots, slots, segment_ids
            kv = {"k": cache["k"], "v": cache["v"]}
        elif cache is None:
            slots = jnp.arange(T)
            q_slots, k_slots, k_segments = slots, slots, segment_ids
            kv, new_segments, index = None, None, 0
        else:
            index = cache_index
            if jnp.ndim(index) == 1:  # a column per row: [B] (slot engine decode, T == 1)
                new_segments = cache["segment_ids"].at[jnp.arange(B), index].set(
                    segment_ids[:, 0].astype(jnp.int32), mode="drop")
                q_slots = index[:, None] + jnp.arange(T)[None]
            else:
                new_segments = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids.astype(jnp.int32),
                                                            (0, index))
                q_slots = index + jnp.arange(T)
            k_slots = jnp.arange(new_segments.shape[1])
            k_segments = new_segments
            kv = {"k": cache["k"], "v": cache["v"]}
        full_mask = attention_mask(segment_ids, k_segments, q_slots, k_slots)
        window_mask = None
        if cfg.sliding_window:
            window_mask = attention_mask(segment_ids, k_segments, q_slots, k_slots, cfg.sliding_window)
        is_sliding = jnp.asarray(cfg.layer_is_sliding())

        layer = DecoderLayer
        policy = remat_policy(self.remat)
        if self.remat != "none":
            layer = nn.remat(DecoderLayer, prevent_cse=False, policy=policy)
        stack = nn.scan(
            layer,
            variable_axes={"params": 0, "lora": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, 0, nn.broadcast),
            out_axes=0,
            length=cfg.num_hidden_layers,
            # scan_unroll <= 0: all layers in one step (no loop); measured faster on CPU and GPU (docs/benchmarks.md)
            unroll=cfg.num_hidden_layers if cfg.scan_unroll <= 0 else min(cfg.scan_unroll, cfg.num_hidden_layers),
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, self.dtype, self.param_dtype, prefill, self.lora, name="layers")
        layer_ids = jnp.arange(cfg.num_hidden_layers)
        masks = (full_mask, window_mask, segment_ids, k_segments)
        (h, kv), _ = stack((h, kv), cos, sin, masks, is_sliding, layer_ids, index)

        h = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="norm")(h)
        if last_only:  # prefill for generation needs only the last position's logits
            h = h[:, -1:]
        if skip_logits:  # the SFT loss applies the head chunk by chunk (sft.step.fused_cross_entropy)
            return None, h, None
        if cfg.tie_word_embeddings:
            logits = embed.attend(h)
        else:
            logits = _dense(cfg.vocab_size, ("embed", "vocab"), False, cfg, self.dtype, self.param_dtype,
                            "lm_head")(h)
        logits = nn.with_logical_constraint(logits.astype(jnp.float32),
                                            ("activation_batch", "activation_length", "activation_vocab"))
        new_cache = None
        if cache is not None:
            new_cache = {"k": kv["k"], "v": kv["v"], "segment_ids": new_segments}
        return logits, h, new_cache


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """Empty KV cache: ``k``/``v`` ``[L, B, KVH, S, Dh]`` (head-major) and slot segment ids ``[B, S]`` (0 = empty)."""
    shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
    }


def default_positions(segment_ids: Array) -> Array:
    """Positions restarting at 0 in each segment; padding slots are skipped (left padding ok)."""
    seg = segment_ids
    valid = (seg > 0).astype(jnp.int32)
    T = seg.shape[1]
    idx = jnp.arange(T)[None, :]
    # A segment starts where its id differs from the previous non-padding token's id.
    starts = jnp.concatenate([jnp.ones_like(seg[:, :1], dtype=bool), seg[:, 1:] != seg[:, :-1]], axis=1) & (seg > 0)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    # Count valid tokens from the segment start (left padding inside a row is not counted).
    cum = jnp.cumsum(valid, axis=1)
    before = jnp.take_along_axis(cum - valid, start_idx, axis=1)
    return jnp.where(seg > 0, cum - 1 - before, 0).astype(jnp.int32)
