"""Attention kernels: the TPU splash kernel (Pallas interpret mode on CPU) equals the XLA path on padded,
packed and sliding-window rows; each implementation produces the kernel it claims; cuDNN on a GPU."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import rng as make_rng
from teams_rl_jax.errors import ConfigError
from teams_rl_jax.models import init
from teams_rl_jax.models.attention import attention, cache_attention, resolve_impl, segment_mask

TINY = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def _segments(B: int, T: int) -> np.ndarray:
    """Row 0: left padding then one sequence; row 1: three packed sequences then right padding."""
    seg = np.ones((B, T), np.int32)
    seg[0, :5] = 0
    seg[1, 40:70], seg[1, 70:100], seg[1, 100:] = 2, 3, 0
    return seg


def _qkv(rng, B, T, H, K, Dh, dtype=jnp.float32):
    return tuple(jnp.asarray(rng.normal(size=s), dtype) for s in ((B, T, H, Dh), (B, T, K, Dh), (B, T, K, Dh)))


def test_resolve_impl_by_platform():
    """auto -> cuDNN on GPU only for bf16/fp16 and head_dim <= 128 (multiple of 8), splash on TPU, XLA on CPU;
    an override wins; an unknown name is a ConfigError naming the key (catches a swapped platform branch)."""
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert resolve_impl("auto", bf16, 128, "gpu") == "cudnn"
    assert resolve_impl("auto", f32, 128, "gpu") == "xla"  # cuDNN flash takes no float32
    assert resolve_impl("auto", bf16, 256, "gpu") == "xla"
    assert resolve_impl("auto", bf16, 128, "tpu") == "splash"
    assert resolve_impl("auto", bf16, 128, "cpu") == "xla"
    assert resolve_impl("splash_interpret", f32, 16, "cpu") == "splash_interpret"
    with pytest.raises(ConfigError, match="model.attention"):
        resolve_impl("flash", f32, 16, "cpu")


@pytest.mark.parametrize("window", [None, 24])
def test_splash_interpret_equals_xla(window):
    """Splash (interpret mode) == XLA on every non-padding position: left padding, three packed segments,
    GQA (4 query heads on 2 kv heads), with and without a sliding window. Catches: segment ids not passed
    to the kernel (packed rows attend across segments), a dropped or off-by-one window, the softmax scale
    not folded into q, a wrong GQA head grouping."""
    rng = make_rng(11 + (window or 0), "qkv")
    B, T, H, K, Dh = 2, 128, 4, 2, 16
    q, k, v = _qkv(rng, B, T, H, K, Dh)
    seg = jnp.asarray(_segments(B, T))
    slots = jnp.arange(T)
    mask = segment_mask(seg, seg, slots, slots, window)
    kw = dict(mask=mask, q_segments=seg, k_segments=seg, window=window, self_attention=True)
    ref = np.asarray(attention(q, k, v, impl="xla", **kw))
    out = np.asarray(jax.jit(lambda q, k, v: attention(q, k, v, impl="splash_interpret", **kw))(q, k, v))
    valid = np.asarray(seg) > 0
    np.testing.assert_allclose(out[valid], ref[valid], atol=2e-5, rtol=2e-5)


def _model_jaxpr(impl: str, T: int, sliding_window=None) -> str:
    cfg = dict(TINY, model_type="mistral", sliding_window=sliding_window) if sliding_window else TINY
    lm = init(cfg, jax.random.key(0))
    lm = lm.replace(config=dataclasses.replace(lm.config, attention_impl=impl))
    ids = jnp.zeros((2, T), jnp.int32)
    return str(jax.make_jaxpr(lambda p: lm.apply(p, ids, jnp.asarray(_segments(2, T)) if T == 128 else None))(
        lm.params))


def test_each_impl_produces_the_kernel_it_claims():
    """The model's traced program holds a Pallas call exactly when splash is chosen (and the length fits
    its 128-lane blocks), none for XLA (``auto`` on CPU is XLA: test_resolve_impl_by_platform). Catches a
    dispatch that ignores the override."""
    assert "pallas_call" in _model_jaxpr("splash_interpret", 128, sliding_window=32)
    assert "pallas_call" not in _model_jaxpr("xla", 128)
    assert "pallas_call" not in _model_jaxpr("splash_interpret", 64)  # documented fallback: 64 % 128 != 0


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA GPU (run on the device machine)")
@pytest.mark.parametrize("window", [None, 24])
def test_cudnn_on_gpu_equals_xla_and_is_a_cudnn_call(window):
    """On a GPU: the cuDNN path compiles to cuDNN's fused attention custom call and equals the XLA path
    on non-padding positions for padded + packed bf16 rows (bf16 tolerance). Catches a silent fallback."""
    rng = make_rng(5, "qkv")
    B, T, H, K, Dh = 2, 128, 4, 2, 64
    q, k, v = _qkv(rng, B, T, H, K, Dh, jnp.bfloat16)
    seg = jnp.asarray(_segments(B, T))
    slots = jnp.arange(T)
    kw = dict(mask=segment_mask(seg, seg, slots, slots, window), q_segments=seg, k_segments=seg, window=window,
              self_attention=True)
    fused = jax.jit(lambda q, k, v: attention(q, k, v, impl="cudnn", **kw))
    hlo = fused.lower(q, k, v).compile().as_text()
    assert "__cudnn$fmha" in hlo, "no cuDNN fused-attention custom call in the compiled HLO"
    grad_hlo = jax.jit(jax.grad(lambda q: attention(q, k, v, impl="cudnn", **kw).astype(jnp.float32).sum())).lower(
        q).compile().as_text()
    assert "__cudnn$fmha" in grad_hlo and "Backward" in grad_hlo
    ref = np.asarray(attention(q, k, v, impl="xla", **kw).astype(jnp.float32))
    out = np.asarray(fused(q, k, v).astype(jnp.float32))
    valid = np.asarray(seg) > 0
    np.testing.assert_allclose(out[valid], ref[valid], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("T", [1, 3])
def test_cache_attention_equals_dot_product_attention(T):
    """A decode step over the head-major cache equals ``jax.nn.dot_product_attention`` over the same keys in
    the slot-major layout, with GQA (4 query heads per kv head), empty/padding slots and a per-row window.
    Catches: the mask dropped or broadcast to the wrong axis, query heads grouped with the wrong kv head
    (head h belongs to kv head h // G), the output heads put back out of order, the scale missing."""
    seed = int(np.random.default_rng().integers(1 << 30))
    rng = np.random.default_rng(seed)
    B, S, H, K, Dh = 3, 40, 8, 2, 16
    q = jnp.asarray(rng.normal(size=(B, T, H, Dh)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, S, K, Dh)), jnp.float32) for _ in range(2))
    k_seg = np.ones((B, S), np.int32)
    k_seg[0, :7] = 0  # left padding
    k_seg[1, 30:] = 0  # empty slots after the written ones
    q_slots = np.array([25 + t for t in range(T)])
    mask = segment_mask(jnp.ones((B, T), jnp.int32), jnp.asarray(k_seg), jnp.asarray(q_slots), jnp.arange(S),
                        window=None)
    mask = mask & jnp.asarray(rng.random((B, 1, T, S)) > 0.3).at[:, :, :, 20].set(True)  # keep a visible key
    ref = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1 / np.sqrt(Dh), implementation="xla")
    out = cache_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask, scale=1 / np.sqrt(Dh))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6, err_msg=f"seed={seed}")
