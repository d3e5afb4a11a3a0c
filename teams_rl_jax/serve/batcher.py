"""Continuous batching for the server: every request's rows go straight into the backend's slots.

The backend's ``ContinuousEngine`` (``backends.continuous``) owns ``max_batch`` KV-cache slots and one
engine thread: a row joins a free slot between decode chunks and its future resolves as soon as the
row ends (EOS, its own ``max_tokens``, or a stop string), whatever else shares the batch. This module
only bridges the event loop to those futures, so the loop keeps accepting requests while the
accelerator works, and a short request is never held behind a long one.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

from teams_rl_jax.backends.base import Completion


class Batcher:
    """Async front of a ``FlaxBackend``'s continuous-batching engine (see the module docstring)."""

    def __init__(self, backend):
        self.backend = backend
        self.max_batch = int(backend.max_batch)

    def start(self) -> None:
        """Nothing to start: the engine thread starts with the first row."""

    async def stop(self) -> None:
        """Wait for the rows already admitted or queued (a draining shutdown)."""
        engine = self.backend._engine
        if engine is not None:
            await asyncio.to_thread(engine.drain)

    async def submit(self, ids: Sequence[Sequence[int]], *, max_tokens: int, temperature: float, top_p: float,
                     stop: Sequence[str] | None, seed: int | None) -> list[Completion]:
        """One row per prompt in ``ids``; waits for all of them (each resolves as soon as it ends)."""
        futures = self.backend.submit_ids(ids, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                          stop=stop, seed=seed)
        try:
            return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        except asyncio.CancelledError:  # the client went away: its rows leave their slots at the next chunk
            for f in futures:
                f.cancel()
            raise

    # Counters for /stats (the engine's).
    def _engine_stat(self, name: str) -> int:
        e = self.backend._engine
        return 0 if e is None else int(getattr(e, name))

    @property
    def generate_calls(self) -> int:
        return self._engine_stat("decode_calls")

    @property
    def rows(self) -> int:
        return self._engine_stat("rows")

    @property
    def max_rows_per_call(self) -> int:
        return self._engine_stat("max_live")

    @property
    def in_flight(self) -> int:
        """Rows queued or decoding now."""
        e = self.backend._engine
        return 0 if e is None else e.in_flight
