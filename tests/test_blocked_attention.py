"""The XLA path's blocked causal self-attention (``models.blocked_attention``) against jax's own
``jax.nn.dot_product_attention(implementation="xla")`` with the boolean segment mask: outputs and all
three input gradients, on padded, packed, GQA, sliding-window and ragged-block rows, and a FLOP count
showing that the blocks above the diagonal are not computed."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import rng as make_rng
from teams_rl_jax.models import blocked_attention
from teams_rl_jax.models.attention import segment_mask
from teams_rl_jax.models.blocked_attention import blocked_causal_attention, block_size


def _segments(B: int, T: int) -> np.ndarray:
    """Row 0: left padding then one sequence; row 1: three packed sequences then right padding; others: full."""
    seg = np.ones((B, T), np.int32)
    seg[0, :7] = 0
    a, b = T // 3, 2 * T // 3
    seg[1, a:b], seg[1, b:T - 5], seg[1, T - 5:] = 2, 3, 0
    return seg


def _reference(q, k, v, seg, window):
    T = q.shape[1]
    slots = jnp.arange(T)
    mask = segment_mask(seg, seg, slots, slots, window)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1 / math.sqrt(q.shape[-1]), implementation="xla")


CASES = {  # name: (B, T, H, K, Dh, window, block)
    "mha_4_blocks": (2, 64, 4, 4, 16, None, 16),
    "gqa_ragged_last_block": (3, 50, 4, 2, 8, None, 16),  # 50 = 3 * 16 + 2
    "gqa_window_inside_block": (2, 64, 6, 2, 8, 11, 16),
    "window_spans_blocks": (2, 64, 2, 1, 8, 37, 16),
    "one_block": (2, 40, 2, 2, 8, None, None),  # default block (128) > T
}


@pytest.mark.parametrize("keep", ["kept", "recomputed"])
@pytest.mark.parametrize("name", list(CASES))
def test_blocked_equals_dot_product_attention_and_gradients(name, keep, monkeypatch):
    """Forward on every non-padding query and d/dq, d/dk, d/dv (cotangent zero on padding queries, whose
    outputs are documented garbage) within 2e-5 of jax's XLA attention, float32. Catches: a dropped causal
    or segment mask, a window off by one or not skipped/applied, a block's key range cut short, GQA heads
    grouped wrongly, the softmax-gradient ``delta`` term or the scale dropped in the custom backward; in both
    backward modes (probabilities kept from the forward, or recomputed from the log-sum-exp)."""
    if keep == "recomputed":
        monkeypatch.setattr(blocked_attention, "KEEP_PROBABILITIES_BYTES", 0)
    B, T, H, K, Dh, window, block = CASES[name]
    rng = make_rng(sum(map(ord, name)), name)
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((B, T, H, Dh), (B, T, K, Dh), (B, T, K, Dh)))
    seg = jnp.asarray(_segments(B, T))
    valid = np.asarray(seg) > 0
    dout = jnp.asarray(rng.normal(size=(B, T, H, Dh)), jnp.float32) * jnp.asarray(valid)[:, :, None, None]

    def ours(q, k, v):
        return blocked_causal_attention(q, k, v, seg, seg, scale=1 / math.sqrt(Dh), window=window, block=block)

    def ref(q, k, v):
        return _reference(q, k, v, seg, window)

    out, vjp = jax.vjp(jax.jit(ours), q, k, v)
    residuals = [x for x in jax.tree_util.tree_leaves(vjp) if getattr(x, "ndim", 0) == 5]  # [B,K,G,n,w] blocks
    assert bool(residuals) == (keep == "kept"), "the backward mode does not follow KEEP_PROBABILITIES_BYTES"
    want, vjp_ref = jax.vjp(ref, q, k, v)
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(want)[valid], atol=2e-5, rtol=2e-5)
    for got, exp, what in zip(vjp(dout), vjp_ref(dout), "qkv"):
        scale = float(jnp.max(jnp.abs(exp)))
        assert scale > 0.05, f"d{what} is near zero: the comparison would be vacuous"
        np.testing.assert_allclose(np.asarray(got), np.asarray(exp), atol=2e-5 * max(scale, 1.0), rtol=2e-5,
                                   err_msg=f"d{what}")


def test_blocked_bfloat16_close_to_float32():
    """bf16 inputs: scores, softmax and accumulation stay float32, so the result is within bf16 rounding of
    the float32 computation (a bf16 softmax would be ~1e-2 off)."""
    rng = make_rng(3, "bf16")
    B, T, H, K, Dh = 2, 48, 4, 2, 16
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((B, T, H, Dh), (B, T, K, Dh), (B, T, K, Dh)))
    seg = jnp.ones((B, T), jnp.int32)
    f = lambda *a: blocked_causal_attention(*a, seg, seg, scale=0.25, block=16)  # noqa: E731
    out32 = np.asarray(f(q, k, v))
    out16 = f(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out16.astype(jnp.float32)), out32, atol=3e-2, rtol=3e-2)


def test_blocks_above_the_diagonal_are_not_computed():
    """XLA's cost analysis of the compiled forward: 4 blocks of a 512-token row cost at most 70% of the
    full-matrix reference's FLOPs (exactly 5/8 of the score and value matmuls; the projections are not in
    this function). Catches a block that reads all keys instead of its causal prefix."""
    B, T, H, Dh = 1, 512, 2, 64
    x = jnp.zeros((B, T, H, Dh), jnp.float32)
    seg = jnp.ones((B, T), jnp.int32)

    def flops(fn):
        cost = jax.jit(fn).lower(x, x, x).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost["flops"])

    ours = flops(lambda q, k, v: blocked_causal_attention(q, k, v, seg, seg, scale=0.125, block=128))
    full = flops(lambda q, k, v: _reference(q, k, v, seg, None))
    matmuls = 2 * 2 * B * H * T * T * Dh
    assert full >= matmuls, (full, matmuls)
    assert ours <= 0.7 * full, f"blocked attention costs {ours:.3g} FLOPs, the full matrix {full:.3g}"


def test_block_size_bounds_the_number_of_blocks():
    """At most 16 (unrolled) blocks at any length, and 128-row blocks for short rows."""
    assert block_size(100) == 128 and block_size(2048) == 128
    assert block_size(8192) == 512 and -(-8192 // block_size(8192)) <= 16
    assert -(-10000 // block_size(10000)) <= 16


def test_rejects_cross_attention():
    """Queries and keys must be the same slots (a decode step goes through jax's attention instead)."""
    x = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="self-attention only"):
        blocked_causal_attention(x, jnp.zeros((1, 9, 2, 8)), jnp.zeros((1, 9, 2, 8)), jnp.ones((1, 4)),
                                 jnp.ones((1, 9)), scale=1.0)
