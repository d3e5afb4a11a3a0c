"""Rows of fixed length from tokenized sequences: packed (several examples per row) or one per row.

A row is four int32 arrays of length ``T``: ``input_ids``, ``segment_ids`` (0 = padding, 1, 2, ... per
example), ``positions`` (restart at 0 in each segment) and ``loss_mask``. The model's attention never
crosses segments (it masks on segment ids) and the loss only takes targets inside the same segment,
so packing changes neither any example's logits nor the summed loss.

Packing is first-fit over a window of the most recent ``window`` open rows, in the given order (the
order is already shuffled from the seed): deterministic, near-linear time, and far denser than
next-fit (on the shared evolved-Alpaca sample at T=256: next-fit fills ~75% of slots, this ~90%).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

KEYS = ("input_ids", "segment_ids", "positions", "loss_mask")


def _empty(n_rows: int, T: int, pad_id: int) -> dict[str, np.ndarray]:
    rows = {k: np.zeros((n_rows, T), np.int32) for k in KEYS}
    rows["input_ids"][:] = pad_id
    return rows


def pack_rows(seqs: Sequence[tuple[np.ndarray, np.ndarray]], T: int, pad_id: int = 0,
              window: int = 64) -> dict[str, np.ndarray]:
    """Pack ``(ids, loss_mask)`` sequences (each ``<= T``) into rows; returns arrays ``[R, T]``."""
    layout: list[list[int]] = []
    free: list[int] = []  # room left in each row
    for i, (ids, _) in enumerate(seqs):
        n = len(ids)
        if n > T:
            raise ValueError(f"sequence {i} has {n} tokens > row length {T}")
        for r in range(max(0, len(layout) - window), len(layout)):
            if free[r] >= n:
                break
        else:
            layout.append([])
            free.append(T)
            r = len(layout) - 1
        layout[r].append(i)
        free[r] -= n
    rows = _empty(len(layout), T, pad_id)
    for r, members in enumerate(layout):
        start = 0
        for seg, i in enumerate(members, 1):
            ids, mask = seqs[i]
            n = len(ids)
            rows["input_ids"][r, start:start + n] = ids
            rows["segment_ids"][r, start:start + n] = seg
            rows["positions"][r, start:start + n] = np.arange(n)
            rows["loss_mask"][r, start:start + n] = mask
            start += n
    return rows


def unpacked_rows(seqs: Sequence[tuple[np.ndarray, np.ndarray]], T: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """One sequence per row, right-padded to ``T``."""
    rows = _empty(len(seqs), T, pad_id)
    for r, (ids, mask) in enumerate(seqs):
        n = len(ids)
        rows["input_ids"][r, :n] = ids
        rows["segment_ids"][r, :n] = 1
        rows["positions"][r, :n] = np.arange(n)
        rows["loss_mask"][r, :n] = mask
    return rows


def segment_attention_mask(segment_ids: np.ndarray) -> np.ndarray:
    """Boolean ``[B, T, T]`` mask the model applies: causal, same non-zero segment."""
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
    T = segment_ids.shape[1]
    return same & np.tril(np.ones((T, T), bool))[None]
