"""4-bit NormalFloat (NF4) weights for a frozen QLoRA base (Dettmers et al. 2023, arXiv 2305.14314).

A kernel ``W [..., in, out]`` is cut into blocks of ``block`` (64) consecutive *input* rows per output
column; each block stores its absolute maximum (float32) and, per weight, the index of the nearest of the
16 NF4 levels to ``w / absmax`` (4 bits, two per byte). 7B-scale arithmetic: 0.5 byte + 4/64 byte per
weight = 0.5625 B against bf16's 2 B, so Llama-2-7B's 6.5 B projection weights take 3.6 GB instead of
13.0 GB.

Layout, chosen to equal ``bitsandbytes.functional.quantize_4bit(W.T, blocksize, "nf4")`` bit for bit (the
test checks it): torch stores a Linear as ``[out, in]`` and bitsandbytes blocks that flattened, so its
blocks run along ``in``; two consecutive inputs share a byte, the first in the high nibble. Here
``codes [..., in/2, out]`` (uint8) and ``absmax [..., in/block, out]``, so both keep the kernel's two
logical axes and shard like it (an fsdp/tensor split of ``in`` or ``out`` that divides the blocks
keeps each block whole on one device).

Not done: double quantization of ``absmax`` (8-bit absmax with a second-level scale, another 0.37 bit
per weight, ~0.3 GB at 7B), and the paged optimizer (nothing to page: only the adapters' moments exist).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# The 16 NF4 levels: quantiles of N(0, 1) normalised to [-1, 1] with an exact zero (8 positive levels,
# 7 negative; QLoRA appendix E). tests/test_nf4.py rebuilds them from scipy's normal quantiles.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
# Decision thresholds: a scaled weight equal to a midpoint takes the lower level (as bitsandbytes does).
_MIDPOINTS = (NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / 2

BLOCK = 64


def check_shape(shape: tuple[int, ...], block: int = BLOCK, name: str = "kernel") -> None:
    """Raise ``ValueError`` naming ``name`` unless its input dim (``shape[-2]``) splits into whole blocks."""
    if block < 2 or block % 2:
        raise ValueError(f"NF4 block size must be even and >= 2 (got {block})")
    if len(shape) < 2 or shape[-2] % block:
        raise ValueError(f"{name}: NF4 needs the input dim ({shape[-2] if len(shape) > 1 else shape}) to be a "
                         f"multiple of the block size {block}")


def quantize(w: jax.Array, block: int = BLOCK) -> tuple[jax.Array, jax.Array]:
    """``w [..., in, out]`` -> ``(codes uint8 [..., in/2, out], absmax float32 [..., in/block, out])``.

    Pure jnp (``sft.lora.quantize_base`` jits it per layer into the frozen base's shardings); computed in
    float32 whatever ``w``'s dtype. Elementwise plus one reduction per block: XLA fuses it, so the transient is
    the float32 copy of ``w``, not 16 copies.
    """
    check_shape(w.shape, block)
    *lead, n_in, n_out = w.shape
    x = w.astype(jnp.float32).reshape(*lead, n_in // block, block, n_out)
    absmax = jnp.max(jnp.abs(x), axis=-2)
    # Multiply by the reciprocal (not divide), clamp, then compare with the midpoints: bitsandbytes' recipe,
    # so near-ties round the same way. An all-zero block maps to the zero level (XLA flushes a subnormal
    # floor such as bitsandbytes' 1e-38 to 0, which would give 0 * inf = NaN here).
    inv = jnp.where(absmax > 0, 1.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
    scaled = jnp.clip(x * inv[..., None, :], -1.0, 1.0)
    idx = jnp.sum(scaled[..., None] > jnp.asarray(_MIDPOINTS), axis=-1).astype(jnp.uint8)
    idx = idx.reshape(*lead, n_in // 2, 2, n_out)
    codes = (idx[..., 0, :] << 4) | idx[..., 1, :]
    return codes, absmax


def dequantize(codes: jax.Array, absmax: jax.Array, dtype=jnp.float32) -> jax.Array:
    """``codes [..., in/2, out]``, ``absmax [..., in/block, out]`` -> ``W [..., in, out]`` in ``dtype``
    (level x absmax in float32, then cast, as bitsandbytes)."""
    *lead, half, n_out = codes.shape
    n_blocks = absmax.shape[-2]
    idx = jnp.stack([codes >> 4, codes & 0xF], axis=-2).reshape(*lead, 2 * half, n_out)
    levels = jnp.asarray(NF4_LEVELS)[idx.astype(jnp.int32)]
    w = levels.reshape(*lead, n_blocks, (2 * half) // n_blocks, n_out) * absmax[..., None, :]
    return w.reshape(*lead, 2 * half, n_out).astype(dtype)


def quantized_shapes(shape: tuple[int, ...], block: int = BLOCK) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(codes shape, absmax shape)`` of a ``shape`` kernel."""
    *lead, n_in, n_out = shape
    return (*lead, n_in // 2, n_out), (*lead, n_in // block, n_out)


class Packed(NamedTuple):
    """A quantized kernel as one pytree (``codes``, ``absmax``) with the dense kernel's ``shape``; what
    ``models.lm.save_pretrained`` dequantizes one layer at a time."""

    codes: jax.Array
    absmax: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, half, n_out = self.codes.shape
        return (*lead, 2 * half, n_out)


def pack_params(flat: dict) -> dict:
    """``{path: leaf}`` with each ``(..., "kernel_nf4")`` / ``(..., "kernel_absmax")`` pair replaced by one
    ``(..., "kernel"): Packed`` entry (the path the dense kernel has)."""
    out = {p: v for p, v in flat.items() if p[-1] not in ("kernel_nf4", "kernel_absmax")}
    for p, v in flat.items():
        if p[-1] == "kernel_nf4":
            out[p[:-1] + ("kernel",)] = Packed(v, flat[p[:-1] + ("kernel_absmax",)])
    return out


@jax.custom_vjp
def matmul(x: jax.Array, codes: jax.Array, absmax: jax.Array) -> jax.Array:
    """``x @ dequantize(codes, absmax)`` in ``x``'s dtype, differentiable in ``x`` only (the base is frozen).

    Why a custom VJP: plain autodiff keeps the dequantized ``W`` as the residual for ``dx = dy W^T``, and
    under the layer scan those residuals stack into a full bf16 copy of every layer's weights (13 GB at 7B),
    the very memory NF4 saves. Here the residuals are the 4-bit codes, and the backward dequantizes again
    (one layer's ``W`` live at a time; an elementwise pass, cheap next to the matmul).
    """
    return x @ dequantize(codes, absmax, x.dtype)


def _matmul_fwd(x, codes, absmax):
    return matmul(x, codes, absmax), (codes, absmax)


def _matmul_bwd(res, g):
    codes, absmax = res
    # No cotangent for the frozen codes and scales (None = zero; the codes are integers).
    return g @ dequantize(codes, absmax, g.dtype).T, None, None


matmul.defvjp(_matmul_fwd, _matmul_bwd)
