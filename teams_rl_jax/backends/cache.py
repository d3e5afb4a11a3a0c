"""Content-addressed response cache: no LLM query is paid twice.

``CachedBackend(inner, ResponseCache(path))`` implements the :class:`~teams_rl_jax.backends.base.Backend`
protocol around any backend. Each prompt of a ``complete``/``score`` call is looked up under a key that
hashes the backend kind, the model and the *full* request (prompt or chat messages, ``max_new_tokens``,
``temperature``, ``top_p``, ``stop``, ``seed``); hits are *replayed*, and only the misses go to the
inner backend, in one batched call (so batching survives a partly warm cache). Every answer is
committed to SQLite before it is returned, so a run killed at any point replays, on restart,
everything it already paid for.

Why SQLite (stdlib ``sqlite3``) rather than a JSONL log: atomic commits that survive ``kill -9`` (WAL
journal), concurrent readers, and key lookups without loading the file. Why per prompt and not per
call: a resumed run batches the remaining work differently.

Past one machine (``ResponseCache(path, read_dir=...)``): each worker / process writes only its own
file (``cache/responses.<worker>.sqlite``, :func:`teams_rl_jax.layout.response_cache_file`), since an
SQLite file is never shared by writers on several hosts; a lookup that misses there also reads every
other ``responses*.sqlite`` in ``read_dir`` (opened read-only, re-listed on each lookup, so files of
workers that start later are found, and the single-process ``responses.sqlite`` of an older run is one
more source), so nothing any worker paid for is paid again. Those files use SQLite's rollback journal
rather than WAL: WAL needs shared memory, which a reader on another host does not have.

Nothing secret is stored: the key and the row hold the request content and the model *name*; API
keys live in the inner backend's client and never reach this module.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from teams_rl_jax.backends.base import Completion, Prompt, QueryCounter
from teams_rl_jax.errors import BackendError

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    model TEXT NOT NULL,
    kind TEXT NOT NULL,
    role TEXT NOT NULL,
    tag TEXT NOT NULL,
    request TEXT NOT NULL,
    response TEXT NOT NULL,
    created REAL NOT NULL
)
"""


def backend_kind(backend: Any) -> str:
    """A stable name of a backend's implementation (``flax``, ``openai`` ... or its class name)."""
    return str(getattr(backend, "kind", None) or type(backend).__name__)


def request_key(backend: str, model: str, kind: str, request: dict) -> str:
    """sha256 over the canonical JSON of (backend, model, kind, request)."""
    blob = json.dumps({"backend": backend, "model": model, "kind": kind, "request": request},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """One SQLite file of responses (usually ``run_dir/cache/responses.sqlite``); thread-safe.

    ``read_dir``: also look up (never write) every other ``responses*.sqlite`` there (see the module
    docstring); those files and this one then use the rollback journal instead of WAL."""

    def __init__(self, path: str | Path, read_dir: str | Path | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.read_dir = Path(read_dir) if read_dir is not None else None
        self._lock = threading.Lock()
        self._others: dict[Path, sqlite3.Connection] = {}
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=60.0)
            # A committed row survives kill -9 of the writer in either mode; WAL only where no other host reads.
            self._db.execute(f"PRAGMA journal_mode={'WAL' if self.read_dir is None else 'DELETE'}")
            self._db.execute(SCHEMA)
            self._db.commit()
        except sqlite3.DatabaseError as e:
            raise BackendError(f"{self.path}: cannot open the response cache ({e})") from None

    def _other_dbs(self) -> list[sqlite3.Connection]:
        """Read-only connections to the other workers' files in ``read_dir`` (new files picked up)."""
        if self.read_dir is None:
            return []
        for p in sorted(self.read_dir.glob("responses*.sqlite")):
            if p.resolve() == self.path.resolve() or p in self._others:
                continue
            try:
                db = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False, timeout=60.0)
                db.execute("SELECT 1 FROM responses LIMIT 1")  # a file still being created: try again next lookup
            except sqlite3.Error:
                continue
            self._others[p] = db
        return list(self._others.values())

    @staticmethod
    def _lookup(db: sqlite3.Connection, keys: Sequence[str], out: dict[str, Any]) -> None:
        for i in range(0, len(keys), 500):  # SQLite's bound-parameter limit
            chunk = list(keys[i:i + 500])
            q = f"SELECT key, response FROM responses WHERE key IN ({','.join('?' * len(chunk))})"
            for k, v in db.execute(q, chunk):
                out[k] = json.loads(v)

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        """``{key: response}`` for the keys present (this file first, then the other workers')."""
        out: dict[str, Any] = {}
        with self._lock:
            self._lookup(self._db, keys, out)
            for db in self._other_dbs():
                rest = [k for k in keys if k not in out]
                if not rest:
                    break
                try:
                    self._lookup(db, rest, out)
                except sqlite3.Error:  # e.g. a hot journal of a killed writer: its owner rolls it back
                    continue
        return out

    def put_many(self, rows: Sequence[tuple[str, str, str, str, str, str, dict, Any]]) -> None:
        """Store ``(key, backend, model, kind, role, tag, request, response)`` rows in one committed transaction."""
        now = time.time()
        with self._lock:
            self._db.executemany(
                "INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(k, b, m, kind, role, tag, json.dumps(req, ensure_ascii=False), json.dumps(resp, ensure_ascii=False),
                  now) for k, b, m, kind, role, tag, req, resp in rows])
            self._db.commit()

    def paid_by_role(self, tag: str) -> dict[str, int]:
        """Queries paid (= rows stored) under ``tag``, by role, in this file and the other workers':
        exact even across kill -9s, since a row is committed with its answer."""
        q = "SELECT role, COUNT(*) FROM responses WHERE tag = ? GROUP BY role"
        out: dict[str, int] = {}
        with self._lock:
            for db in [self._db, *self._other_dbs()]:
                try:
                    rows = db.execute(q, (tag,)).fetchall()
                except sqlite3.Error:
                    if db is self._db:
                        raise
                    continue
                for r, n in rows:
                    out[r] = out.get(r, 0) + int(n)
        return out

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
            for db in self._others.values():
                db.close()
            self._others.clear()


class CachedBackend:
    """A :class:`Backend` that replays cached answers and pays the inner backend only for misses.

    ``stats()`` -> ``{"paid": n, "replayed": n}`` for this role in this process; the inner backend's own counter
    counts only what it was actually asked (the paid queries). ``counter`` here counts every query
    (paid + replayed): what the run asked for.
    """

    def __init__(self, inner: Any, cache: ResponseCache, counter: QueryCounter | None = None, tag: str = ""):
        self.inner = inner
        self.tag = tag  # who paid (e.g. the generate output dir), for ResponseCache.paid_by_role
        self.cache = cache
        self.role = inner.role
        self.model = inner.model
        self.kind = backend_kind(inner)
        self.counter = counter if counter is not None else QueryCounter()
        self._lock = threading.Lock()
        self._paid = 0
        self._replayed = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"paid": self._paid, "replayed": self._replayed}

    def _tally(self, paid: int, replayed: int) -> None:
        with self._lock:
            self._paid += paid
            self._replayed += replayed
        self.counter.add(self.role, paid + replayed)

    def complete(self, prompts: Sequence[Prompt], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, stop: Sequence[str] | None = None, seed: int | None = None
                 ) -> list[Completion]:
        params = {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature), "top_p": float(top_p),
                  "stop": list(stop) if stop else None, "seed": seed}
        reqs = [{"prompt": p if isinstance(p, str) else [dict(m) for m in p], **params} for p in prompts]
        keys = [request_key(self.kind, self.model, "complete", r) for r in reqs]
        hits = self.cache.get_many(keys)
        first: dict[str, int] = {}  # identical prompts inside one call are paid once
        miss = [i for i, k in enumerate(keys) if k not in hits and first.setdefault(k, i) == i]
        if miss:
            got = self.inner.complete([prompts[i] for i in miss], max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_p=top_p, stop=stop, seed=seed)
            if len(got) != len(miss):
                raise BackendError(f"{self.role}: backend returned {len(got)} completions for {len(miss)} prompts")
            rows = []
            for i, c in zip(miss, got):
                resp = {"text": c.text, "token_ids": list(c.token_ids) if c.token_ids is not None else None,
                        "finish_reason": c.finish_reason, "completion_tokens": c.completion_tokens}
                hits[keys[i]] = resp
                rows.append((keys[i], self.kind, self.model, "complete", self.role, self.tag, reqs[i], resp))
            self.cache.put_many(rows)
        self._tally(len(miss), len(prompts) - len(miss))
        out = []
        for k in keys:
            r = hits[k]
            ids = tuple(r["token_ids"]) if r.get("token_ids") is not None else None
            out.append(Completion(text=r["text"], token_ids=ids, finish_reason=r.get("finish_reason", "stop"),
                                  completion_tokens=r.get("completion_tokens")))
        return out

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        reqs = [{"prompt": p, "continuation": c} for p, c in zip(prompts, continuations)]
        keys = [request_key(self.kind, self.model, "score", r) for r in reqs]
        hits = self.cache.get_many(keys)
        first: dict[str, int] = {}
        miss = [i for i, k in enumerate(keys) if k not in hits and first.setdefault(k, i) == i]
        if miss:
            got = self.inner.score([prompts[i] for i in miss], [continuations[i] for i in miss])
            rows = []
            for i, v in zip(miss, got):
                hits[keys[i]] = float(v)
                rows.append((keys[i], self.kind, self.model, "score", self.role, self.tag, reqs[i], float(v)))
            self.cache.put_many(rows)
        self._tally(len(miss), len(prompts) - len(miss))
        return [float(hits[k]) for k in keys]
