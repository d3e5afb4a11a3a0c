"""Deterministic, resumable batches for SFT, split across processes.

Epoch ``e`` orders the sequences with ``np.random.default_rng([seed, e]).permutation`` (or keeps the
file order when ``shuffle=False``), packs them (or not) into rows of ``seq_len``, and cuts the rows
into global batches of ``global_batch`` rows. A short last batch is dropped (``drop_remainder=True``,
every example is still seen in other epochs' orders) or filled with all-padding rows, which carry no
loss, so every step has the same shape on every process.

Multi-host split: process ``p`` of ``n`` takes the **contiguous** rows ``[p * B/n, (p+1) * B/n)`` of
each global batch. Concatenating the processes' parts in process order gives the global batch, which
is what ``jax.make_array_from_process_local_data`` expects for a batch axis sharded over all devices
in process order. Every process reads and packs the whole dataset (same seed, same result), so all
agree on the number of steps without communicating.

The iterator's position is :meth:`BatchIterator.state`, a small JSON-able dict (``epoch``, ``step`` plus
a fingerprint of the data layout) saved with every checkpoint; :meth:`BatchIterator.restore` continues
with exactly the batch that would have come next and refuses a position saved for other data.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from teams_rl_jax.data.packing import KEYS, empty_rows, pack_rows, unpacked_rows
from teams_rl_jax.data.readers import read_dataset
from teams_rl_jax.data.tokenize import tokenize_dataset
from teams_rl_jax.errors import CheckpointError, ConfigError, DataError

_CACHED_EPOCHS = 2  # the current epoch plus one looked-ahead (steps_per_epoch of the next)


class BatchIterator:
    """Infinite iterator of this process's part of each global batch: numpy dict of int32 ``[B/n, T]``
    arrays ``input_ids``, ``segment_ids``, ``positions``, ``loss_mask``."""

    def __init__(self, seqs: Sequence[tuple[np.ndarray, np.ndarray]], *, global_batch: int, seq_len: int,
                 pack: bool = True, seed: int = 0, pad_id: int = 0, process_index: int = 0, process_count: int = 1,
                 shuffle: bool = True, drop_remainder: bool = True, pack_window: int = 64):
        if global_batch < 1 or process_count < 1 or not 0 <= process_index < process_count:
            raise ConfigError(f"bad batch split: global_batch={global_batch}, process {process_index} of "
                              f"{process_count}")
        if global_batch % process_count:
            raise ConfigError(f"global batch {global_batch} is not divisible by {process_count} processes")
        if not seqs:
            raise DataError("no sequences to batch (every example was dropped, or the dataset is empty)")
        self.seqs = list(seqs)
        self.global_batch, self.seq_len, self.pack = global_batch, seq_len, pack
        self.seed, self.pad_id, self.shuffle, self.drop_remainder = seed, pad_id, shuffle, drop_remainder
        self.pack_window = pack_window
        self.process_index, self.process_count = process_index, process_count
        self.epoch, self.step = 0, 0
        self._cache: dict[int, dict[str, np.ndarray]] = {}
        if self.steps_per_epoch(0) == 0:
            raise DataError(f"the dataset gives {self.rows_in_epoch(0)} rows, fewer than one global batch of "
                            f"{global_batch} (set drop_remainder=false or use a smaller batch)")

    def order(self, epoch: int) -> np.ndarray:
        """Indices of the sequences in epoch ``epoch``'s order."""
        if not self.shuffle:
            return np.arange(len(self.seqs))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.seqs))

    def _epoch_rows(self, epoch: int) -> dict[str, np.ndarray]:
        if epoch not in self._cache:
            seqs = [self.seqs[i] for i in self.order(epoch)]
            if self.pack:
                rows = pack_rows(seqs, self.seq_len, self.pad_id, self.pack_window)
            else:
                rows = unpacked_rows(seqs, self.seq_len, self.pad_id)
            short = -len(rows["input_ids"]) % self.global_batch
            if short and not self.drop_remainder:
                pad = empty_rows(short, self.seq_len, self.pad_id)
                rows = {k: np.concatenate([rows[k], pad[k]]) for k in KEYS}
            if len(self._cache) >= _CACHED_EPOCHS:
                # evict a past epoch first, else the one farthest ahead
                self._cache.pop(min(self._cache, key=lambda e: (e >= self.epoch, -abs(e - self.epoch))))
            self._cache[epoch] = rows
        return self._cache[epoch]

    def rows_in_epoch(self, epoch: int | None = None) -> int:
        """Rows in an epoch, padding rows included (packing makes it depend on the epoch's order, slightly)."""
        return len(self._epoch_rows(self.epoch if epoch is None else epoch)["input_ids"])

    def steps_per_epoch(self, epoch: int | None = None) -> int:
        """Global batches in an epoch."""
        return self.rows_in_epoch(epoch) // self.global_batch

    def _fingerprint(self) -> dict[str, Any]:
        return {"seed": int(self.seed), "num_sequences": len(self.seqs), "global_batch": int(self.global_batch),
                "seq_len": int(self.seq_len), "pack": bool(self.pack)}

    def state(self) -> dict[str, Any]:
        """Position to save in a checkpoint: ``{"epoch", "step", ...data-layout fingerprint}``."""
        return {"epoch": int(self.epoch), "step": int(self.step), **self._fingerprint()}

    def restore(self, state: dict) -> None:
        """Continue from a saved :meth:`state`; CheckpointError if it was saved for another data layout."""
        try:
            epoch, step = int(state["epoch"]), int(state["step"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"data position must hold integer 'epoch' and 'step', got {state!r}") from None
        for key, now in self._fingerprint().items():
            if key in state and state[key] != now:  # positions saved before a key existed still restore
                raise CheckpointError(f"data position was saved with {key}={state[key]!r} but the data now has "
                                      f"{key}={now!r}; resume with the same dataset and data settings")
        if epoch < 0 or step < 0:
            raise CheckpointError(f"negative data position {state!r}")
        self.epoch, self.step = epoch, step

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        while self.step >= self.steps_per_epoch():
            self.epoch, self.step = self.epoch + 1, 0
        rows = self._epoch_rows(self.epoch)
        local = self.global_batch // self.process_count
        start = self.step * self.global_batch + self.process_index * local
        self.step += 1
        return {k: rows[k][start:start + local] for k in KEYS}


def make_batch_iterator(cfg, tokenizer, *, global_batch: int, path: str | None = None, process_index: int = 0,
                        process_count: int = 1, log=None):
    """Read, tokenize and batch the dataset of a :class:`~teams_rl_jax.data.config.DataConfig`.

    ``path`` overrides ``cfg.path`` (e.g. the SFT stage's resolution of ``"auto"``). Returns
    ``(BatchIterator, TokenizeStats)``; the stats line goes to ``log`` when given.
    """
    cfg.validate()
    path = cfg.path if path is None else path
    if path == "auto":
        raise ConfigError("data.path is 'auto': the caller must resolve it to a file")
    examples = read_dataset(path, cfg.format, split=cfg.tfds_split)
    seqs, stats = tokenize_dataset(examples, tokenizer, cfg.template, cfg.max_seq_len, cfg.min_response_tokens,
                                   cfg.chat_template)
    if log is not None:
        log(f"[data] {path}: {stats.summary()}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    it = BatchIterator(seqs, global_batch=global_batch, seq_len=cfg.max_seq_len, pack=cfg.pack,
                       seed=cfg.shuffle_seed, pad_id=pad_id, process_index=process_index,
                       process_count=process_count, shuffle=cfg.shuffle, drop_remainder=cfg.drop_remainder,
                       pack_window=cfg.pack_window)
    return it, stats
