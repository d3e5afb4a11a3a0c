"""Continuous batching, the host side: one thread that keeps the slots of ``slot_engine`` busy.

Callers (``FlaxBackend.generate_ids``, the server's batcher, any number of threads) ``submit`` one row
at a time and get a ``concurrent.futures.Future``. The engine thread loops:

1. admit waiting rows into free slots (one batched :func:`slot_engine.insert`, prompts bucketed);
2. run one :func:`slot_engine.decode` chunk of at most ``chunk`` steps over the live slots;
3. hand each finished row its ``Completion`` at once (EOS, its own ``max_new_tokens``, or a stop string
   seen on the host) and free its slot for the next waiting row.

So a short request never waits for a long neighbour to end, and a long one never blocks admission.
``chunk`` trades host round trips (one per chunk) against steps a finished row may idle (< ``chunk``).
The cache length grows by powers of two to fit the longest request seen (``slot_engine.grow``); its size
is ``slots x cache_len x layers x 2 x kv_heads x head_dim x dtype bytes`` (the server logs it).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
from typing import Callable, Sequence

import jax
import numpy as np

from teams_rl_jax import sharding, slot_engine
from teams_rl_jax.generation import sampling_mode

MIN_LEN_BUCKET = 16
SAMPLING_MODES = ("greedy", "sample", "filtered")  # slot_engine.decode sampling modes, cheapest first
log = logging.getLogger(__name__)


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(int(n), int(minimum), 1)
    return 1 << (n - 1).bit_length()


def _powers(lo: int, hi: int) -> list[int]:
    """The buckets from ``bucket(lo)`` to ``hi`` (a power of two): every value ``bucket`` can give there."""
    out, v = [], bucket(lo)
    while v <= hi:
        out.append(v)
        v *= 2
    return out


@dataclasses.dataclass
class _Row:
    ids: list[int]
    limit: int
    temperature: float
    top_p: float
    key: np.ndarray                     # uint32 [2]: raw PRNG key data of this request
    stop: tuple[str, ...] | None
    future: concurrent.futures.Future
    tokens: list[int] = dataclasses.field(default_factory=list)
    ptr: int = 0                        # next cache column (host mirror of the device's)


class ContinuousEngine:
    """Slots + one engine thread over ``lm`` (see the module docstring).

    ``finish(tokens, limit, stop)`` turns a row's tokens into a ``Completion`` (the backend's EOS/stop
    cut); ``decode(tokens)`` gives text for the stop-string check. Counters: ``decode_calls``,
    ``insert_calls``, ``rows`` (completed rows), ``max_live`` (most slots live in one decode call).
    """

    def __init__(self, lm, *, slots: int, eos_ids: Sequence[int], pad_id: int, finish: Callable,
                 decode: Callable[[list[int]], str], mesh=None, chunk: int = 8, min_rows: int = 1):
        self.lm = lm
        self.mesh = mesh
        self.min_rows = max(1, int(min_rows))           # the mesh's batch ways: every batch dim a multiple
        self.slots = bucket(int(slots), self.min_rows) if self.min_rows > 1 else int(slots)
        self.eos = np.asarray(list(eos_ids) or [-1], np.int32)
        self.pad_id = int(pad_id)
        self.chunk = bucket(int(chunk))
        self._finish, self._decode = finish, decode
        self._cv = threading.Condition()
        self._pending: collections.deque[_Row] = collections.deque()
        self._live: dict[int, _Row] = {}
        self._state = None
        self._cache_len = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        self.decode_calls = self.insert_calls = self.rows = self.max_live = 0

    # ---- callers ---------------------------------------------------------------------------------
    def submit(self, ids: Sequence[int], *, limit: int, temperature: float, top_p: float, key: np.ndarray,
               stop: Sequence[str] | None) -> concurrent.futures.Future:
        return self.submit_many([dict(ids=ids, limit=limit, temperature=temperature, top_p=top_p, key=key,
                                      stop=stop)])[0]

    def submit_many(self, rows: Sequence[dict]) -> list[concurrent.futures.Future]:
        """Queue several rows at once (``submit``'s keyword arguments each): the engine sees them together,
        so one call's rows are admitted in one batched prefill rather than as they trickle in."""
        new = [_Row([int(t) for t in r["ids"]], int(r["limit"]), float(r["temperature"]), float(r["top_p"]),
                    np.asarray(r["key"], np.uint32).reshape(2), tuple(r["stop"]) if r["stop"] else None,
                    concurrent.futures.Future()) for r in rows]
        with self._cv:
            if self._closed:
                raise RuntimeError("the continuous-batching engine is closed")
            self._pending.extend(new)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="continuous-batching", daemon=True)
                self._thread.start()
            self._cv.notify()
        return [r.future for r in new]

    def drain(self) -> None:
        """Block until every submitted row has completed (new rows may still be submitted)."""
        with self._cv:
            while self._pending or self._live:
                self._cv.wait(0.05)

    def close(self) -> None:
        """Refuse new rows; wait for the submitted ones."""
        with self._cv:
            self._closed = True
        self.drain()

    @property
    def in_flight(self) -> int:
        """Rows waiting for a slot or decoding."""
        return len(self._pending) + len(self._live)

    @property
    def cache_bytes(self) -> int:
        if self._state is None:
            return 0
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(self._state["cache"]))

    # ---- the engine thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                if not self._pending and not self._live:
                    # Idle: the thread ends (the next submit starts another), so an idle engine holds no
                    # thread that would keep the backend, its weights and its cache alive after the
                    # backend is dropped (a pipeline's generate-stage expert before its SFT stage).
                    self._thread = None
                    self._cv.notify_all()
                    return
                free = [s for s in range(self.slots) if s not in self._live]
                admit = [self._pending.popleft() for _ in range(min(len(free), len(self._pending)))]
                admit = [r for r in admit if not r.future.cancelled()]
            try:
                with self._rules():
                    if admit:
                        self._admit(admit, free[:len(admit)])
                    if self._live:
                        self._step()
            except Exception as e:  # noqa: BLE001 - every waiting row gets the failure; the state restarts
                for r in list(self._live.values()) + admit:
                    if not r.future.done():
                        r.future.set_exception(e)
                self._live.clear()
                self._state, self._cache_len = None, 0

    def _rules(self):
        import contextlib
        return sharding.activation_rules(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _ensure_state(self, need: int) -> None:
        if self._state is None:
            self._cache_len = bucket(need, MIN_LEN_BUCKET)
            state = jax.jit(slot_engine.init_state, static_argnums=(0, 1, 2))(self.lm.module, self.slots,
                                                                               self._cache_len)
            # Committed where it lies: a jit with no array inputs returns uncommitted arrays, and the first
            # insert on them would lower once more than every later call on its (committed) outputs.
            self._state = jax.tree_util.tree_map(lambda x: jax.device_put(x, x.sharding), state)
        elif need > self._cache_len:
            self._cache_len = bucket(need)
            self._state = slot_engine.grow(self._state, self._cache_len)
        else:
            return
        log.info("KV cache: %d slots x %d columns = %.1f MiB", self.slots, self._cache_len, self.cache_bytes / 2**20)

    def warm(self, max_prompt: int, max_new: int, modes: Sequence[str] = SAMPLING_MODES) -> dict:
        """Before the first request: allocate the KV cache that requests of up to ``max_prompt`` prompt tokens
        and ``max_new`` new tokens need, and compile every program they can ask for (``insert`` for each
        (``k``, ``Tb``) bucket pair, ``decode`` for each sampling mode in ``modes`` and (``n_steps``, ``W``)),
        on filler rows that change no slot. Then the memory peak is known at start and no request waits for a
        compile (as a server captures its graphs before serving). Returns the program and cache counts."""
        with self._cv:
            if self._thread is not None or self._pending or self._live:
                raise RuntimeError("ContinuousEngine.warm: call it before the first request")
        top = bucket(max_prompt, MIN_LEN_BUCKET)
        ks = _powers(self.min_rows, bucket(self.slots, self.min_rows))
        tbs, ns = _powers(MIN_LEN_BUCKET, top), _powers(1, self.chunk)
        with self._rules():
            self._ensure_state(top + int(max_new))
            for Tb in tbs:
                for k in ks:
                    self._state, _ = slot_engine.insert(self.lm.params, self._state,
                                                        *self._prefill_arrays([], [], k, Tb), self.eos,
                                                        module=self.lm.module)
            evict = np.ones((self.slots,), bool)  # no live slot: the loop runs no step
            windows = _powers(MIN_LEN_BUCKET, self._cache_len)
            for mode in modes:
                for n in ns:
                    for w in windows:
                        self._state, _ = slot_engine.decode(self.lm.params, self._state, evict, self.eos,
                                                            np.int32(self.pad_id), module=self.lm.module, n_steps=n,
                                                            window=w, mode=mode)
            jax.block_until_ready(self._state)
        return {"insert": len(ks) * len(tbs), "decode": len(modes) * len(ns) * len(windows),
                "cache_len": self._cache_len, "cache_bytes": self.cache_bytes}

    def _prefill_arrays(self, rows: list[_Row], slots: list[int], k: int, Tb: int):
        """``insert``'s row arguments for ``rows`` into ``slots``, padded to ``k`` rows with filler rows (slot
        index out of range: dropped)."""
        ids = np.full((k, Tb), self.pad_id, np.int32)
        mask = np.zeros((k, Tb), np.int32)
        slot_ix = np.full((k,), self.slots, np.int32)            # filler rows: out of range, dropped
        limits = np.ones((k,), np.int32)
        temps = np.zeros((k,), np.float32)
        top_p = np.ones((k,), np.float32)
        keys = np.zeros((k, 2), np.uint32)
        for b, (r, s) in enumerate(zip(rows, slots)):
            ids[b, Tb - len(r.ids):] = r.ids
            mask[b, Tb - len(r.ids):] = 1
            slot_ix[b], limits[b], temps[b], top_p[b], keys[b] = s, r.limit, r.temperature, r.top_p, r.key
        mask[len(rows):, -1] = 1  # filler rows: one real token, so no row is all padding
        return ids, mask, slot_ix, limits, temps, top_p, keys

    def _admit(self, rows: list[_Row], slots: list[int]) -> None:
        Tb = bucket(max(len(r.ids) for r in rows), MIN_LEN_BUCKET)
        self._ensure_state(max(Tb + r.limit for r in rows))
        k = bucket(len(rows), self.min_rows)
        self._state, first = slot_engine.insert(self.lm.params, self._state,
                                                *self._prefill_arrays(rows, slots, k, Tb), self.eos,
                                                module=self.lm.module)
        self.insert_calls += 1
        first = np.asarray(jax.device_get(first))
        for b, (r, s) in enumerate(zip(rows, slots)):
            r.tokens, r.ptr = [int(first[b])], Tb
            self._live[s] = r
        self._retire(done=None)

    def _step(self) -> None:
        rem = max(r.limit - len(r.tokens) for r in self._live.values())
        n = min(self.chunk, bucket(max(rem, 1)))
        window = min(self._cache_len, bucket(max(r.ptr for r in self._live.values()) + n, MIN_LEN_BUCKET))
        evict = np.ones((self.slots,), bool)
        evict[list(self._live)] = False
        before = {s: len(r.tokens) for s, r in self._live.items()}
        # The cheapest sampling branch the live rows need, picked here: a device-side cond would sync per step.
        mode = max((sampling_mode(r.temperature, None, r.top_p) for r in self._live.values()),
                   key=SAMPLING_MODES.index)
        self._state, out = slot_engine.decode(self.lm.params, self._state, evict, self.eos, np.int32(self.pad_id),
                                              module=self.lm.module, n_steps=n, window=window, mode=mode)
        self.decode_calls += 1
        self.max_live = max(self.max_live, len(self._live))
        out, step, done = jax.device_get((out, self._state["step"], self._state["done"]))
        for s, r in self._live.items():
            new = int(step[s]) - before[s]
            r.tokens.extend(int(t) for t in out[s, :new])
            r.ptr += new
        self._retire(done=np.asarray(done))

    def _retire(self, done) -> None:
        """Complete rows that hit EOS or their limit (device ``done``) or a stop string; free their slots."""
        eos = {int(e) for e in self.eos}
        for s, r in list(self._live.items()):
            finished = len(r.tokens) >= r.limit or r.tokens[-1] in eos or (done is not None and bool(done[s]))
            if not finished and r.stop:
                text = self._decode(r.tokens)
                finished = any(x and x in text for x in r.stop)
            if finished or r.future.cancelled():
                del self._live[s]
                self.rows += 1
                if not r.future.done():
                    try:
                        r.future.set_result(self._finish(r.tokens, r.limit, r.stop))
                    except Exception as e:  # noqa: BLE001 - a decode failure belongs to this row only
                        r.future.set_exception(e)
