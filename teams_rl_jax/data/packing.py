"""Rows of fixed length from tokenized sequences: packed (several examples per row) or one per row.

A row is four int32 arrays of length ``T``: ``input_ids``, ``segment_ids`` (0 = padding, 1, 2, ... per
example, in order along the row), ``positions`` (restart at 0 in each segment, 0 on padding) and
``loss_mask`` (0 on padding). The model attends only within a segment (:func:`segment_attention_mask`)
and the loss only takes targets in the same segment as their input, so packing changes neither any
example's logits nor the summed loss.

Packing is first-fit over the ``window`` most recently opened rows, in the given order (the pipeline
shuffles that order from the seed): deterministic, linear time, and far denser than next-fit. On the
shared evolved-Alpaca set (1,386 examples, byte-level BPE) at T=512, one example per row fills 45% of the
slots, next-fit 76%, this 92% (a window of 1,000 rows: 93%).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

KEYS = ("input_ids", "segment_ids", "positions", "loss_mask")

Seq = tuple[np.ndarray, np.ndarray]  # (ids [n], loss_mask [n])


def empty_rows(n_rows: int, T: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """``n_rows`` all-padding rows (segment 0, loss 0): used to fill a short last batch."""
    rows = {k: np.zeros((n_rows, T), np.int32) for k in KEYS}
    rows["input_ids"][:] = pad_id
    return rows


def first_fit(lengths: Sequence[int], T: int, window: int = 64) -> tuple[np.ndarray, np.ndarray, int]:
    """Row and offset of each sequence under windowed first-fit: ``(row [N], offset [N], n_rows)``.

    Sequence ``i`` goes to the first of the last ``window`` rows with room, else to a new row; within
    a row sequences keep their order.
    """
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and lengths.max() > T:
        i = int(np.argmax(lengths))
        raise ValueError(f"sequence {i} has {lengths[i]} tokens > row length {T}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    free = np.empty(len(lengths), np.int64)  # room left in each row (at most one row per sequence)
    row = np.empty(len(lengths), np.int64)
    offset = np.empty(len(lengths), np.int64)
    n_rows = 0
    for i, n in enumerate(lengths):
        lo = max(0, n_rows - window)
        fits = np.flatnonzero(free[lo:n_rows] >= n)
        if len(fits):
            r = lo + int(fits[0])
        else:
            r, n_rows = n_rows, n_rows + 1
            free[r] = T
        row[i], offset[i] = r, T - free[r]
        free[r] -= n
    return row, offset, n_rows


def _fill(seqs: Sequence[Seq], row: np.ndarray, offset: np.ndarray, segment: np.ndarray, n_rows: int, T: int,
          pad_id: int) -> dict[str, np.ndarray]:
    """Scatter all sequences into rows in one vectorized pass."""
    out = empty_rows(n_rows, T, pad_id)
    if not len(seqs):
        return out
    lengths = np.fromiter((len(ids) for ids, _ in seqs), np.int64, len(seqs))
    starts = row * T + offset
    seq_of_token = np.repeat(np.arange(len(seqs)), lengths)
    pos = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    flat = starts[seq_of_token] + pos
    out["input_ids"].reshape(-1)[flat] = np.concatenate([ids for ids, _ in seqs])
    out["loss_mask"].reshape(-1)[flat] = np.concatenate([m for _, m in seqs])
    out["segment_ids"].reshape(-1)[flat] = segment[seq_of_token]
    out["positions"].reshape(-1)[flat] = pos
    return out


def pack_rows(seqs: Sequence[Seq], T: int, pad_id: int = 0, window: int = 64) -> dict[str, np.ndarray]:
    """Pack ``(ids, loss_mask)`` sequences (each ``<= T`` tokens) into rows; arrays int32 ``[R, T]``."""
    row, offset, n_rows = first_fit([len(ids) for ids, _ in seqs], T, window)
    segment = np.empty(len(seqs), np.int64)
    count = np.zeros(n_rows, np.int64)
    for i, r in enumerate(row):  # segment ids 1, 2, ... in order of placement within each row
        count[r] += 1
        segment[i] = count[r]
    return _fill(seqs, row, offset, segment, n_rows, T, pad_id)


def unpacked_rows(seqs: Sequence[Seq], T: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """One sequence per row (segment 1), right-padded to ``T``."""
    n = len(seqs)
    for i, (ids, _) in enumerate(seqs):
        if len(ids) > T:
            raise ValueError(f"sequence {i} has {len(ids)} tokens > row length {T}")
    return _fill(seqs, np.arange(n), np.zeros(n, np.int64), np.ones(n, np.int64), n, T, pad_id)


def segment_attention_mask(segment_ids: np.ndarray) -> np.ndarray:
    """Boolean ``[B, T, T]`` mask the model applies: causal, same non-zero segment."""
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
    T = segment_ids.shape[1]
    return same & np.tril(np.ones((T, T), bool))[None]


def fill_ratio(rows: dict[str, np.ndarray]) -> float:
    """Fraction of row slots holding tokens (1 - padding)."""
    seg = rows["segment_ids"]
    return float((seg > 0).mean()) if seg.size else 0.0
