"""Causal self-attention in query blocks, for the XLA path (CPU, and GPUs in float32).

``jax.nn.dot_product_attention(implementation="xla")`` computes every ``[B, H, T, S]`` score, masks
the upper triangle afterwards, and its autodiff keeps the float32 probabilities (and the quotient-rule
terms of the softmax) for the backward. This version, with the same maths:

* splits the queries into blocks of ``block`` rows; block ``[s0, s1)`` meets only keys ``[lo, s1)``
  (``lo`` > 0 under a sliding window), so the blocks above the diagonal are never computed: 5/8 of the
  score and value matmuls at 4 blocks, ~1/2 at many;
* works head-major (``[B, K, G*n, Dh]`` against ``[B, K, S, Dh]``: plain batched GEMMs, the layout
  XLA:CPU's dot emitter takes without transposing each operand);
* has a ``custom_vjp`` in the FlashAttention style (``dS = P * (dP - rowsum(dO * O))``): small problems
  keep the block probabilities for the backward; above ``KEEP_PROBABILITIES_BYTES`` the forward saves
  only the row log-sum-exp ``[B, H, T]`` and the backward recomputes each block's probabilities, so no
  ``[B, H, T, S]`` array is kept between the passes.

Measured on the 2-core CPU (batch 8, 512 tokens, 8 heads of 64, float32; docs/benchmarks.md): one
layer's attention, forward 190-230 -> 82 ms and forward + backward 432-478 -> 279 ms (jax's XLA path ->
this, 128-row blocks); torch's fused SDPA CPU kernel: 40 and 160 ms.

Masking is by segment ids (0 = padding, k > 0 = packed segment k), causal in slot order, optional
window, as ``masks.segment_mask``. A query with no visible key (padding) gets a uniform average
over its block's keys: finite garbage that every consumer masks out (the XLA path's garbage differs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from teams_rl_jax.models.masks import segment_mask

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


def _bias(q_seg, k_seg, s0, s1, lo, window):
    """Additive mask ``[B, n, s1 - lo]`` (0 = visible, ``_NEG`` = hidden) for query block ``[s0, s1)``.

    A float bias added to the scores, not a ``where`` over them: XLA:CPU fuses the broadcast add into
    the score matmul's output, while a 5-D ``where`` was a separate pass costing 3x the matmul
    (110 vs 27 ms for one 512-token layer, 2-core CPU).
    """
    visible = segment_mask(q_seg[:, s0:s1], k_seg[:, lo:s1], s0 + jnp.arange(s1 - s0), lo + jnp.arange(s1 - lo),
                           window)[:, 0]
    return jnp.where(visible, 0.0, _NEG).astype(jnp.float32)


def _scores(qb, kh, bias, s1, lo):
    """Masked float32 scores ``[B, K, G, n, s1 - lo]`` of the (pre-scaled) query block ``qb [B, K, G, n, Dh]``."""
    B, K, G, n, D = qb.shape
    s = jnp.einsum("bkqd,bksd->bkqs", qb.reshape(B, K, G * n, D), kh[:, :, lo:s1], preferred_element_type=jnp.float32)
    return s.reshape(B, K, G, n, s1 - lo) + bias[:, None, None]


# Keep the forward's probabilities for the backward when they are this small (bytes, all blocks):
# -15% of the attention's forward + backward on CPU (no score matmul and exp to redo); above it, the
# backward recomputes them from the log-sum-exp and nothing [B,H,T,S]-sized outlives the forward.
KEEP_PROBABILITIES_BYTES = 256 * 2**20


def _keep_probabilities(rows: int, spans) -> bool:
    """Whether ``rows`` (batch x heads) of float32 block probabilities fit ``KEEP_PROBABILITIES_BYTES``."""
    return rows * sum((s1 - s0) * (s1 - lo) for s0, s1, lo in spans) * 4 <= KEEP_PROBABILITIES_BYTES


def _heads(q, k, v, scale):
    """``q [B,T,H,Dh]`` -> ``scale * q`` as ``[B,K,G,T,Dh]`` (the softmax scale folded into the queries,
    as splash/MaxText do); ``k, v [B,S,K,Dh]`` -> ``[B,K,S,Dh]``."""
    B, T, H, D = q.shape
    K = k.shape[2]
    qs = q * jnp.asarray(scale, q.dtype)
    return (qs.reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3),
            v.transpose(0, 2, 1, 3))


def _forward(q, k, v, q_seg, k_seg, scale, window, block):
    qh, kh, vh = _heads(q, k, v, scale)
    B, K, G, T, D = qh.shape
    spans = _spans(T, block, window)
    keep = _keep_probabilities(B * K * G, spans)
    outs, lses, probs = [], [], []
    for s0, s1, lo in spans:
        n = s1 - s0
        s = _scores(qh[:, :, :, s0:s1], kh, _bias(q_seg, k_seg, s0, s1, lo, window), s1, lo)
        m = jnp.max(s, axis=-1, keepdims=True)
        e = jnp.exp(s - m)
        l = jnp.sum(e, axis=-1, keepdims=True)  # noqa: E741
        # Normalise after the value matmul ([n, Dh] divisions instead of [n, S]): -20% of the forward.
        o = jnp.einsum("bkqs,bksd->bkqd", e.reshape(B, K, G * n, s1 - lo).astype(v.dtype), vh[:, :, lo:s1],
                       preferred_element_type=jnp.float32)
        outs.append(o.reshape(B, K, G, n, D) / l)
        if keep:
            probs.append(e / l)
        else:
            lses.append((m + jnp.log(l))[..., 0])
    o = jnp.concatenate(outs, axis=3)  # [B,K,G,T,Dh] float32
    out = o.transpose(0, 3, 1, 2, 4).reshape(q.shape).astype(q.dtype)
    lse = None if keep else jnp.concatenate(lses, axis=-1)
    return out, (q, k, v, q_seg, k_seg, out, lse, tuple(probs))


def _backward(scale, window, block, res, dout):
    q, k, v, q_seg, k_seg, out, lse, probs = res
    qh, kh, vh = _heads(q, k, v, scale)
    B, K, G, T, D = qh.shape
    f32 = jnp.float32
    do = dout.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4)
    delta = jnp.sum(do.astype(f32) * out.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4).astype(f32), axis=-1)
    dq, dk, dv = [], jnp.zeros(kh.shape, f32), jnp.zeros(vh.shape, f32)
    for i, (s0, s1, lo) in enumerate(_spans(T, block, window)):
        n, w = s1 - s0, s1 - lo
        qb = qh[:, :, :, s0:s1]
        if probs:
            p = probs[i]
        else:  # recompute the block's probabilities from the saved log-sum-exp (FlashAttention)
            p = jnp.exp(_scores(qb, kh, _bias(q_seg, k_seg, s0, s1, lo, window), s1, lo) - lse[..., s0:s1, None])
        dob = do[:, :, :, s0:s1].reshape(B, K, G * n, D)
        dv = dv.at[:, :, lo:s1].add(jnp.einsum("bkqs,bkqd->bksd", p.reshape(B, K, G * n, w).astype(v.dtype), dob,
                                               preferred_element_type=f32))
        dp = jnp.einsum("bkqd,bksd->bkqs", dob, vh[:, :, lo:s1], preferred_element_type=f32).reshape(B, K, G, n, w)
        ds = (p * (dp - delta[..., s0:s1, None])).reshape(B, K, G * n, w).astype(q.dtype)  # d(scores)
        dq.append(jnp.einsum("bkqs,bksd->bkqd", ds, kh[:, :, lo:s1], preferred_element_type=f32).reshape(B, K, G, n, D))
        dk = dk.at[:, :, lo:s1].add(jnp.einsum("bkqs,bkqd->bksd", ds, qb.reshape(B, K, G * n, D),
                                               preferred_element_type=f32))
    # scores = (scale * q) k^T: dq picks up the scale, dk is already taken against the scaled queries.
    dq = (jnp.concatenate(dq, axis=3) * scale).transpose(0, 3, 1, 2, 4).reshape(q.shape).astype(q.dtype)
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
