"""The attention mask by segment ids, shared by the XLA paths (``attention``, ``blocked_attention``).

Segment ids: 0 = padding, k > 0 = segment k (packed SFT rows, left-padded prompts); slots order the
tokens causally (a KV cache's slots, or ``arange(T)``).
"""

from __future__ import annotations

import jax

Array = jax.Array


def segment_mask(q_segments: Array, k_segments: Array, q_slots: Array, k_slots: Array,
                 window: int | None = None) -> Array:
    """Boolean mask ``[B, 1, T, S]``: same non-zero segment, causal in slot order, optional window.

    ``q_slots`` is ``[T]`` (every row's queries at the same slots) or ``[B, T]`` (a slot per row: the
    continuous-batching decode step, where each row writes at its own cache column)."""
    same = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] > 0)
    qs = q_slots if q_slots.ndim == 2 else q_slots[None]
    causal = k_slots[None, None, :] <= qs[:, :, None]
    mask = same & causal
    if window:
        mask = mask & ((qs[:, :, None] - k_slots[None, None, :]) < window)
    return mask[:, None]
