"""Dynamic batching: concurrent requests share ONE jitted generate.

Requests land on an asyncio queue. A single worker takes the first, then keeps draining whatever else
arrives within ``wait_ms`` (up to ``max_batch`` rows), groups the rows by sampling parameters (greedy
rows all share one group), and runs the backend's batched generate in a worker thread, so the event
loop keeps accepting requests while the accelerator works. Whatever queued meanwhile forms the next
batch. One worker = one generate in flight: the accelerator is never oversubscribed, and batches
grow with load on their own (continuous batching inside a generate is beyond this server).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Sequence

from teams_rl_jax.backends.base import Completion


@dataclasses.dataclass
class Row:
    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...] | None
    seed: int | None
    future: asyncio.Future


class Batcher:
    """Queue + one worker over a ``FlaxBackend`` (``generate_ids``); see the module docstring."""

    def __init__(self, backend, *, max_batch: int = 32, wait_ms: float = 5.0):
        self.backend = backend
        self.max_batch = int(max_batch)
        self.wait_s = float(wait_ms) / 1000.0
        self.queue: asyncio.Queue[Row] = asyncio.Queue()
        self.generate_calls = 0   # batched generate calls made by this server
        self.rows = 0             # rows generated (a request with n choices is n rows)
        self.max_rows_per_call = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def submit(self, ids: Sequence[Sequence[int]], *, max_tokens: int, temperature: float, top_p: float,
                     stop: Sequence[str] | None, seed: int | None) -> list[Completion]:
        """Queue one row per prompt in ``ids`` and wait for all of them."""
        loop = asyncio.get_running_loop()
        rows = [Row(list(x), int(max_tokens), float(temperature), float(top_p), tuple(stop) if stop else None,
                    seed, loop.create_future()) for x in ids]
        for r in rows:
            self.queue.put_nowait(r)
        return list(await asyncio.gather(*(r.future for r in rows)))

    async def _collect(self) -> list[Row]:
        batch = [await self.queue.get()]
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            # Take everything already queued at once; then wait a few ms for stragglers.
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            left = deadline - time.monotonic()
            if left <= 0 or len(batch) >= self.max_batch:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        while True:
            batch = [r for r in await self._collect() if not r.future.done()]  # skip cancelled clients
            groups: dict[tuple, list[Row]] = {}
            for r in batch:
                # Greedy rows are independent of temperature/top_p/seed: one group for all of them.
                key = ("greedy",) if r.temperature <= 0 else (r.temperature, r.top_p, r.seed)
                groups.setdefault(key, []).append(r)
            for rows in groups.values():
                first = rows[0]
                try:
                    outs = await asyncio.to_thread(
                        self.backend.generate_ids, [r.ids for r in rows], max_new_tokens=[r.max_tokens for r in rows],
                        temperature=first.temperature, top_p=first.top_p, seed=first.seed,
                        stops=[r.stop for r in rows])
                except Exception as e:  # noqa: BLE001 - hand the failure to every waiting request
                    for r in rows:
                        if not r.future.done():
                            r.future.set_exception(e)
                    continue
                self.generate_calls += 1
                self.rows += len(rows)
                self.max_rows_per_call = max(self.max_rows_per_call, len(rows))
                for r, out in zip(rows, outs):
                    if not r.future.done():
                        r.future.set_result(out)
