"""Deterministic, resumable batches for SFT, split across processes.

Epoch ``e`` shuffles the examples with ``np.random.default_rng([seed, e])``, packs them (or not) into
rows, and cuts the rows into global batches of ``global_batch`` rows (a short last batch is dropped,
so every step has the same shape and the same count on every process). Process ``p`` of ``n`` takes
the contiguous rows ``[p * B/n, (p+1) * B/n)`` of each global batch: concatenating the processes'
parts in process order gives the global batch, as ``jax.make_array_from_process_local_data`` expects
for a batch axis sharded over all devices.

The iterator's position is ``{"epoch", "step"}`` (a small dict saved with every checkpoint):
``restore(state)`` continues with exactly the batch that would have come next.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from teams_rl_jax.data.packing import KEYS, pack_rows, unpacked_rows
from teams_rl_jax.errors import DataError


class BatchIterator:
    """Infinite iterator of this process's part of each global batch (numpy dict, int32 ``[B/n, T]``)."""

    def __init__(self, seqs: Sequence[tuple[np.ndarray, np.ndarray]], *, global_batch: int, seq_len: int,
                 pack: bool = True, seed: int = 0, pad_id: int = 0, process_index: int = 0, process_count: int = 1):
        if global_batch % process_count:
            raise DataError(f"global batch {global_batch} not divisible by {process_count} processes")
        self.seqs = list(seqs)
        self.global_batch, self.seq_len, self.pack = global_batch, seq_len, pack
        self.seed, self.pad_id = seed, pad_id
        self.process_index, self.process_count = process_index, process_count
        self.epoch, self.step = 0, 0
        self._rows_epoch, self._rows = None, None
        if self.steps_per_epoch(0) == 0:
            raise DataError(f"dataset gives fewer rows than one global batch of {global_batch}")

    def _epoch_rows(self, epoch: int) -> dict[str, np.ndarray]:
        if self._rows_epoch != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.seqs))
            seqs = [self.seqs[i] for i in order]
            build = pack_rows if self.pack else unpacked_rows
            self._rows, self._rows_epoch = build(seqs, self.seq_len, self.pad_id), epoch
        return self._rows

    def steps_per_epoch(self, epoch: int | None = None) -> int:
        """Global batches in an epoch (packing makes it depend on the epoch's order, slightly)."""
        rows = self._epoch_rows(self.epoch if epoch is None else epoch)
        return len(rows["input_ids"]) // self.global_batch

    def state(self) -> dict[str, int]:
        """Position to save in a checkpoint."""
        return {"epoch": int(self.epoch), "step": int(self.step)}

    def restore(self, state: dict) -> None:
        """Continue from a saved :meth:`state`."""
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.step >= self.steps_per_epoch():
            self.epoch, self.step = self.epoch + 1, 0
        rows = self._epoch_rows(self.epoch)
        local = self.global_batch // self.process_count
        start = self.step * self.global_batch + self.process_index * local
        self.step += 1
        return {k: rows[k][start:start + local] for k in KEYS}
