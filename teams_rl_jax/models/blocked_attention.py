"""Causal self-attention in query blocks, for the XLA path (CPU, and GPUs in float32).

``jax.nn.dot_product_attention(implementation="xla")`` computes every ``[B, H, T, S]`` score, masks
the upper triangle afterwards, and its autodiff keeps the float32 probabilities (and the quotient-rule
terms of the softmax) for the backward. This version, with the same maths:

* splits the queries into blocks of ``block`` rows; block ``[s0, s1)`` meets only keys ``[lo, s1)``
  (``lo`` > 0 under a sliding window), so the blocks above the diagonal are never computed: 5/8 of the
  score and value matmuls at 4 blocks, ~1/2 at many;
* works head-major (``[B, K, G*n, Dh]`` against ``[B, K, S, Dh]``: plain batched GEMMs, the layout
  XLA:CPU's dot emitter takes without transposing each operand);
* has a ``custom_vjp`` in the FlashAttention style: the forward saves the output and the row
  log-sum-exp ``[B, H, T]`` only, and the backward recomputes each block's probabilities from them
  (``dS = P * (dP - rowsum(dO * O))``), so no ``[B, H, T, S]`` array is kept between the passes.

Measured on the 2-core CPU (batch 8, 512 tokens, 8 heads of 64, float32): forward + backward of one
layer's attention 432 -> 297 ms (XLA path -> this, 128-row blocks); torch's SDPA flash kernel 160 ms.

Masking is by segment ids (0 = padding, k > 0 = packed segment k), causal in slot order, optional
window, as ``attention.segment_mask``. A query with no visible key (padding) gets a uniform average
over its block's keys: finite garbage that every consumer masks out (the XLA path's garbage differs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # masked score: exp(_NEG - max) == 0, never inf - inf


def block_size(T: int) -> int:
    """Query rows per block: 128, or more for long rows so that there are at most 16 blocks (the
    blocks are unrolled into the program, so their number bounds compile time)."""
    return max(128, -(-T // 16))


def _spans(T: int, block: int, window: int | None) -> list[tuple[int, int, int]]:
    """Static ``(s0, s1, lo)`` per query block: queries ``[s0, s1)`` see keys ``[lo, s1)``."""
    out = []
    for s0 in range(0, T, block):
        s1 = min(s0 + block, T)
        lo = max(0, s0 - (window - 1)) if window else 0
        out.append((s0, s1, lo))
    return out


def _scores(qb, kh, q_seg, k_seg, s0, s1, lo, scale, window):
    """Masked float32 scores ``[B, K, G, n, s1 - lo]`` of query block ``qb [B, K, G, n, Dh]``."""
    B, K, G, n, D = qb.shape
    s = jnp.einsum("bkqd,bksd->bkqs", qb.reshape(B, K, G * n, D), kh[:, :, lo:s1],
                   preferred_element_type=jnp.float32).reshape(B, K, G, n, s1 - lo) * scale
    qi = s0 + jnp.arange(n)
    ki = lo + jnp.arange(s1 - lo)
    ks = k_seg[:, lo:s1]
    visible = (q_seg[:, s0:s1, None] == ks[:, None, :]) & (ks[:, None, :] > 0) & (ki[None, None, :] <= qi[None, :, None])
    if window:
        visible = visible & ((qi[:, None] - ki[None, :]) < window)[None]
    return jnp.where(visible[:, None, None], s, _NEG)


def _heads(q, k, v):
    """``q [B,T,H,Dh]`` -> ``[B,K,G,T,Dh]``; ``k, v [B,S,K,Dh]`` -> ``[B,K,S,Dh]``."""
    B, T, H, D = q.shape
    K = k.shape[2]
    return (q.reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3),
            v.transpose(0, 2, 1, 3))


def _forward(q, k, v, q_seg, k_seg, scale, window, block):
    qh, kh, vh = _heads(q, k, v)
    B, K, G, T, D = qh.shape
    outs, lses = [], []
    for s0, s1, lo in _spans(T, block, window):
        n = s1 - s0
        s = _scores(qh[:, :, :, s0:s1], kh, q_seg, k_seg, s0, s1, lo, scale, window)
        m = jnp.max(s, axis=-1, keepdims=True)
        e = jnp.exp(s - m)
        l = jnp.sum(e, axis=-1, keepdims=True)  # noqa: E741
        p = (e / l).reshape(B, K, G * n, s1 - lo).astype(v.dtype)
        o = jnp.einsum("bkqs,bksd->bkqd", p, vh[:, :, lo:s1], preferred_element_type=jnp.float32)
        outs.append(o.reshape(B, K, G, n, D))
        lses.append((m + jnp.log(l))[..., 0])
    o = jnp.concatenate(outs, axis=3)  # [B,K,G,T,Dh] float32
    out = o.transpose(0, 3, 1, 2, 4).reshape(q.shape).astype(q.dtype)
    return out, (q, k, v, q_seg, k_seg, out, jnp.concatenate(lses, axis=-1))


def _backward(scale, window, block, res, dout):
    q, k, v, q_seg, k_seg, out, lse = res
    qh, kh, vh = _heads(q, k, v)
    B, K, G, T, D = qh.shape
    f32 = jnp.float32
    do = dout.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4)
    delta = jnp.sum(do.astype(f32) * out.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4).astype(f32), axis=-1)
    dq, dk, dv = [], jnp.zeros(kh.shape, f32), jnp.zeros(vh.shape, f32)
    for s0, s1, lo in _spans(T, block, window):
        n, w = s1 - s0, s1 - lo
        qb = qh[:, :, :, s0:s1]
        p = jnp.exp(_scores(qb, kh, q_seg, k_seg, s0, s1, lo, scale, window) - lse[..., s0:s1, None])
        dob = do[:, :, :, s0:s1].reshape(B, K, G * n, D)
        dv = dv.at[:, :, lo:s1].add(jnp.einsum("bkqs,bkqd->bksd", p.reshape(B, K, G * n, w).astype(v.dtype), dob,
                                               preferred_element_type=f32))
        dp = jnp.einsum("bkqd,bksd->bkqs", dob, vh[:, :, lo:s1], preferred_element_type=f32).reshape(B, K, G, n, w)
        ds = (p * (dp - delta[..., s0:s1, None]) * scale).reshape(B, K, G * n, w).astype(q.dtype)
        dq.append(jnp.einsum("bkqs,bksd->bkqd", ds, kh[:, :, lo:s1], preferred_element_type=f32).reshape(B, K, G, n, D))
        dk = dk.at[:, :, lo:s1].add(jnp.einsum("bkqs,bkqd->bksd", ds, qb.reshape(B, K, G * n, D),
                                               preferred_element_type=f32))
    dq = jnp.concatenate(dq, axis=3).transpose(0, 3, 1, 2, 4).reshape(q.shape).astype(q.dtype)
    return (dq, dk.transpose(0, 2, 1, 3).astype(k.dtype), dv.transpose(0, 2, 1, 3).astype(v.dtype), None, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, q_seg, k_seg, scale, window, block):
    return _forward(q, k, v, q_seg, k_seg, scale, window, block)[0]


_attention.defvjp(_forward, _backward)


def blocked_causal_attention(q: Array, k: Array, v: Array, q_segments: Array, k_segments: Array, *, scale: float,
                             window: int | None = None, block: int | None = None) -> Array:
    """Self-attention ``q [B,T,H,Dh]``, ``k, v [B,T,K,Dh]`` (queries and keys are the same slots, as in a
    training forward or a prefill) with segment ids ``[B,T]``; ``window``: keys closer than ``window``
    slots only (Mistral/Qwen2 sliding window); ``block``: query rows per block (default :func:`block_size`).
    """
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"blocked_causal_attention: self-attention only, got {q.shape[1]} queries and "
                         f"{k.shape[1]} keys")
    return _attention(q, k, v, q_segments.astype(jnp.int32), k_segments.astype(jnp.int32), float(scale),
                      int(window) if window else None, int(block or block_size(q.shape[1])))
