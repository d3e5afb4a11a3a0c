"""The attention mask by segment ids, shared by the XLA paths (``attention``, ``blocked_attention``).

Segment ids: 0 = padding, k > 0 = segment k (packed SFT rows, left-padded prompts); slots order the
tokens causally (a KV cache's slots, or ``arange(T)``).
"""

from __future__ import annotations

import jax

Array = jax.Array


def segment_mask(q_segments: Array, k_segments: Array, q_slots: Array, k_slots: Array,
                 window: int | None = None) -> Array:
    """Boolean mask ``[B, 1, T, S]``: same non-zero segment, causal in slot order, optional window."""
    same = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] > 0)
    causal = k_slots[None, :] <= q_slots[:, None]
    mask = same & causal[None]
    if window:
        mask = mask & ((q_slots[:, None] - k_slots[None, :]) < window)[None]
    return mask[:, None]
