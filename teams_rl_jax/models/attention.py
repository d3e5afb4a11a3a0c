"""Attention kernels for the Llama decoder, chosen by platform with a config override.

``ModelConfig.attention_impl`` names the implementation:

* ``"auto"`` (default): cuDNN on GPU (bf16/fp16 compute, head_dim <= 128 and a multiple of 8), Pallas
  splash attention on TPU, XLA elsewhere (CPU, or a GPU run in float32, which cuDNN's flash kernel
  does not take).
* ``"xla"``: plain XLA ops. Self-attention (training, prefill) runs ``blocked_attention``: causal
  query blocks that skip the blocks above the diagonal, with a FlashAttention-style custom VJP (no
  ``[B,H,T,S]`` array kept for the backward).
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn", is_causal=True, mask=...)``:
  cuDNN's fused flash attention. The public API has no segment-id input (cuDNN's packed "THD"
  layout, ``q_offsets``/``kv_offsets``, is only in the private ``jax._src.cudnn`` module), so packed
  rows and padding reach the kernel as the segment mask, which jax turns into an additive bias of
  shape ``[B,1,T,S]`` in the compute dtype: O(B*T*S) bf16 instead of the XLA path's O(B*H*T*S) f32
  scores, and the causal flag lets cuDNN skip the blocks above the diagonal.
* ``"splash"``: TPU Pallas splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``)
  with ``SegmentIds`` for packing/padding and a static causal (or local, for sliding windows) mask.
  GQA runs as the MQA kernel vmapped over kv-head groups and batch rows.
* ``"splash_interpret"``: the same kernel in Pallas interpret mode, so CPU tests exercise it.
  Splash tiles the sequence in blocks of 128 lanes: a length that is not a multiple of 128 (a short
  prompt, a test) takes the XLA path instead (pad SFT rows to a multiple of 128 on TPU).

The fused kernels serve the self-attention calls (training forward, prefill: queries and keys are the
same slots). A decode step (few queries against a KV cache) always runs :func:`cache_attention`, two
plain matmuls over the model's head-major cache: it is a memory-bound read of the cache, and
cuDNN/splash gain nothing there. (A multiply-reduce form over the old slot-major cache was measured on
an H100 and gained nothing, 2.77 -> 2.74 ms per 1B decode step, so it was dropped.)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from teams_rl_jax.errors import ConfigError
from teams_rl_jax.models.blocked_attention import blocked_causal_attention
from teams_rl_jax.models.masks import segment_mask  # noqa: F401  (re-exported: llama.py, tests)

Array = jax.Array
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash", "splash_interpret")


def resolve_impl(impl: str, dtype: Any, head_dim: int, platform: str | None = None) -> str:
    """The concrete implementation for ``impl`` on ``platform`` (default: jax's default backend)."""
    if impl not in ATTENTION_IMPLS:
        raise ConfigError(f"model.attention: unknown implementation {impl!r} (use one of {', '.join(ATTENTION_IMPLS)})")
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    if platform in ("gpu", "cuda"):
        ok = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim <= 128 \
            and head_dim % 8 == 0
        return "cudnn" if ok else "xla"
    if platform == "tpu":
        return "splash"
    return "xla"


def _block(n: int) -> int:
    """Splash block size along a sequence axis: the largest of 512/256/128 dividing ``n``."""
    return next(b for b in (512, 256, 128) if n % b == 0)


def _splash_kernel(T: int, S: int, groups: int, window: int | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    if window:  # keys in [q - (window - 1), q]: sliding window, causal included
        base = sm.LocalMask((T, S), window_size=(window - 1, 0), offset=0)
    else:
        base = sm.CausalMask((T, S))
    bq, bkv = _block(T), _block(S)
    sizes = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                          block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    # Built per trace, not cached: the kernel is a pytree holding its mask-info arrays, and a kernel
    # cached from one trace (e.g. inside nn.scan) would leak that trace's values into the next.
    return sk.make_splash_mqa_single_device(sm.MultiHeadMask([base] * groups), block_sizes=sizes,
                                            interpret=interpret)


def splash_attention(q: Array, k: Array, v: Array, q_segments: Array, k_segments: Array, *, scale: float,
                     window: int | None = None, interpret: bool = False) -> Array:
    """Splash attention for ``q [B,T,H,Dh]``, ``k, v [B,S,K,Dh]`` with segment ids ``[B,T]`` / ``[B,S]``.

    Tokens attend to keys of the same segment id, causally. Padding (segment 0) attends to padding;
    its outputs are garbage-but-finite and every consumer masks them out.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    B, T, H, Dh = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    kernel = _splash_kernel(T, S, G, window, interpret)
    # splash does not scale the logits: fold the softmax scale into q (as MaxText does).
    qh = (q * jnp.asarray(scale, q.dtype)).reshape(B, T, K, G, Dh).transpose(0, 2, 3, 1, 4)  # [B,K,G,T,Dh]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B,K,S,Dh]
    seg = sk.SegmentIds(q=q_segments.astype(jnp.int32), kv=k_segments.astype(jnp.int32))
    per_group = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over kv heads (MQA kernel per group)
    out = jax.vmap(per_group, in_axes=(0, 0, 0, sk.SegmentIds(q=0, kv=0)))(qh, kh, vh, seg)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, Dh)


def cache_attention(q: Array, k: Array, v: Array, mask: Array, *, scale: float) -> Array:
    """A decode step: ``q [B,T,H,Dh]`` against one layer's head-major cache ``k, v [B,K,S,Dh]`` -> ``[B,T,H,Dh]``.

    ``mask [B,1,T,S]`` (boolean, from :func:`segment_mask`). Both matmuls keep the cache where it lies:
    ``(B, K)`` are their leading batch dims, the scores contract ``Dh`` (the cache's last axis) and the
    output contracts ``S``; only the few queries are reshaped (the ``G = H/K`` heads sharing a kv head
    become rows of one matmul). Scores, softmax and accumulation are float32.
    """
    B, T, H, Dh = q.shape
    K = k.shape[1]
    G = H // K
    qh = (q * jnp.asarray(scale, q.dtype)).reshape(B, T, K, G, Dh).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, Dh)
    s = jnp.einsum("bkqd,bksd->bkqs", qh, k, preferred_element_type=jnp.float32).reshape(B, K, G, T, -1)
    s = s + jnp.where(mask[:, :, None], 0.0, -1e30).astype(jnp.float32)  # [B,1,1,T,S]: every head alike
    p = jax.nn.softmax(s, axis=-1).reshape(B, K, G * T, -1)
    o = jnp.einsum("bkqs,bksd->bkqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(B, K, G, T, Dh).transpose(0, 3, 1, 2, 4).reshape(B, T, H, Dh).astype(q.dtype)


def attention(q: Array, k: Array, v: Array, *, impl: str, mask: Array, q_segments: Array, k_segments: Array,
              window: int | None, self_attention: bool) -> Array:
    """Scaled dot-product attention ``q [B,T,H,Dh]``, ``k, v [B,S,K,Dh]`` -> ``[B,T,H,Dh]``.

    ``mask`` is :func:`segment_mask` (window included where it applies); ``q_segments``/``k_segments``
    and ``window`` feed the kernels that take segment ids; ``self_attention`` says the queries and
    keys are the same slots (training forward, prefill), the only case the fused kernels serve.
    """
    Dh = q.shape[-1]
    scale = 1.0 / math.sqrt(Dh)
    if not self_attention:  # a decode step against a slot-major cache (the model's is head-major: cache_attention)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")
    if impl == "xla":
        return blocked_causal_attention(q, k, v, q_segments, k_segments, scale=scale, window=window)
    if impl == "cudnn":
        local = (window - 1, 0) if window else None
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True,
                                            local_window_size=local, implementation="cudnn")
    if impl in ("splash", "splash_interpret"):
        if q.shape[1] % 128 or k.shape[1] % 128:  # splash's blocks are multiples of the 128 lanes
            return blocked_causal_attention(q, k, v, q_segments, k_segments, scale=scale, window=window)
        return splash_attention(q, k, v, q_segments, k_segments, scale=scale, window=window,
                                interpret=impl == "splash_interpret")
    raise ConfigError(f"model.attention: unknown implementation {impl!r}")
