"""Chunked (fused head + cross-entropy) loss: equals the full ``[B,T,V]`` computation, value and gradients;
float32 maths under bf16 compute; never holds the full logits (compiled memory)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import rng as make_rng
from teams_rl_jax.models import init
from teams_rl_jax.sft.step import full_cross_entropy, fused_cross_entropy, token_losses

TINY = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def _inputs(rng, B, T, D, V, dtype=jnp.float32):
    h = jnp.asarray(rng.normal(size=(B, T, D)), dtype)
    w = jnp.asarray(rng.normal(size=(D, V)) * 0.3, jnp.float32)
    t = jnp.asarray(rng.integers(0, V, size=(B, T)), jnp.int32)
    wt = jnp.asarray(rng.random((B, T)) < 0.7, jnp.float32)  # some positions carry no loss
    return h, w, t, wt


@pytest.mark.parametrize("chunk", [7, 16, 1000])
def test_fused_ce_equals_full_value_and_grads(chunk):
    """Value and d/dh, d/dw within 1e-5 of the full [B,T,V] computation, for a chunk that does not divide
    the token count (zero-weight padding), one that does, and one larger than the batch. Catches: a
    dropped padding mask (padded tokens add loss), the one-hot left out of dlogits, unweighted gradients,
    a missing chunk in the dw accumulation."""
    rng = make_rng(3 + chunk, "ce")
    h, w, t, wt = _inputs(rng, 2, 24, 16, 50)

    def full(h, w):
        return full_cross_entropy(jnp.einsum("btd,dv->btv", h, w), t, wt)

    def fused(h, w):
        return fused_cross_entropy(h, w, t, wt, chunk=chunk)

    (v0, (gh0, gw0)), (v1, (gh1, gw1)) = (jax.value_and_grad(f, argnums=(0, 1))(h, w) for f in (full, fused))
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    np.testing.assert_allclose(gh1, gh0, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(gw1, gw0, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(jax.jit(fused)(h, w), v0, rtol=1e-5)  # the primal (no-grad) path too


@pytest.mark.parametrize("tied", [False, True])
def test_token_losses_chunked_equals_full_logits(tied):
    """Through the model: loss and every parameter gradient with ce_chunk=8 equal ce_chunk=0 (the model's
    own head and full logits) within 1e-5, tied and untied heads. Catches the wrong head (or a missing
    transpose of a tied embedding) and a hidden state taken before the final norm."""
    rng = make_rng(21 + tied, "batch")
    lm = init(dict(TINY, tie_word_embeddings=tied), jax.random.key(int(rng.integers(1 << 30))))
    B, T = 2, 20
    ids = rng.integers(3, TINY["vocab_size"], size=(B, T)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    seg[1, 12:] = 2  # packed
    pos = np.concatenate([np.arange(T)[None], np.r_[np.arange(12), np.arange(8)][None]]).astype(np.int32)
    batch = {"input_ids": ids, "segment_ids": seg, "positions": pos,
             "loss_mask": (rng.random((B, T)) < 0.8).astype(np.int32)}

    def run(chunk):
        f = lambda p: token_losses(lm, p, batch, chunk)  # noqa: E731
        return jax.jit(jax.value_and_grad(f, has_aux=True))(lm.params)

    ((l0, n0), g0), ((l1, n1), g1) = run(0), run(8)
    assert float(n0) == float(n1) > 0
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_bf16_compute_keeps_float32_ce_maths():
    """Under bf16 compute (bf16 hidden states and head), the loss equals a float64 reference on the same
    bf16-rounded operands to 2e-6 relative, while rounding the logits to bf16 (bf16 maths) is off by more
    than 1e-4 (checked here, so the tolerance provably tells f32 from bf16 maths). Catches logits cast to bf16 before the softmax."""
    rng = make_rng(8, "bf16")
    h, w, t, wt = _inputs(rng, 1, 8, 64, 512, jnp.bfloat16)  # few tokens: rounding errors do not average out
    w = w * 4.0  # logits of a few units, where bf16's 2^-8 relative step is ~0.03
    h64 = np.asarray(h.astype(jnp.float32), np.float64)
    w64 = np.asarray(w.astype(jnp.bfloat16).astype(jnp.float32), np.float64)

    def ce64(logits):
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        tgt = np.take_along_axis(logits, np.asarray(t)[..., None], -1)[..., 0]
        return float(np.sum((lse - tgt) * np.asarray(wt)))

    ref = ce64(h64 @ w64)
    ours = float(fused_cross_entropy(h, w, t, wt, chunk=32))
    bf16_maths = ce64(np.asarray(jnp.asarray(h64 @ w64, jnp.bfloat16).astype(jnp.float32), np.float64))
    assert abs(ours - ref) / abs(ref) < 2e-6, (ours, ref)
    assert abs(bf16_maths - ref) / abs(ref) > 1e-4, "bf16 rounding too small for this check to discriminate"


def test_chunked_loss_never_holds_full_logits():
    """Compiled loss+gradient temp memory (XLA memory_analysis) at seq 2048, vocab 32000: the chunked loss
    stays under one [T,V] float32 array, the full one needs at least two. Catches a chunk loop that
    materialises the logits anyway (e.g. a stacked per-chunk output)."""
    T, V, D = 2048, 32000, 64
    h = jax.ShapeDtypeStruct((1, T, D), jnp.float32)
    w = jax.ShapeDtypeStruct((D, V), jnp.float32)
    t = jnp.zeros((1, T), jnp.int32)
    wt = jnp.ones((1, T), jnp.float32)
    full_bytes = T * V * 4

    def mem(f):
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(h, w).compile().memory_analysis().temp_size_in_bytes

    chunked = mem(lambda h, w: fused_cross_entropy(h, w, t, wt, chunk=256))  # 1/8 of T
    full = mem(lambda h, w: full_cross_entropy(jnp.einsum("btd,dv->btv", h, w), t, wt))
    assert full >= 2 * full_bytes, full
    assert chunked < full_bytes / 2, (chunked, full_bytes)
