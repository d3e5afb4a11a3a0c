"""The SQLite response cache: replays instead of paying, keyed by backend, model and the full request."""

import sqlite3

from teams_rl_jax.backends.base import Completion, QueryCounter
from teams_rl_jax.backends.cache import CachedBackend, ResponseCache


class Echo:
    """Counting backend: answers are a function of the request; every prompt it sees is logged."""

    def __init__(self, role="expert", model="m1"):
        self.role, self.model, self.counter, self.seen = role, model, QueryCounter(), []

    def complete(self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, stop=None, seed=None):
        self.seen += list(prompts)
        self.counter.add(self.role, len(prompts))
        return [Completion(f"{p if isinstance(p, str) else p[-1]['content']}|{max_new_tokens}|{temperature}",
                           (1, 2), "length" if max_new_tokens < 3 else "stop") for p in prompts]

    def score(self, prompts, continuations):
        self.seen += list(prompts)
        return [-float(len(c)) for c in continuations]


def test_replay_pays_only_misses_and_persists(tmp_path):
    """Catches: a cache that never hits, stores under a key ignoring parameters, or loses rows on reopen."""
    inner = Echo()
    cb = CachedBackend(inner, ResponseCache(tmp_path / "c.sqlite"))
    a = cb.complete(["x", "y", "x"], max_new_tokens=8)
    assert [c.text for c in a] == ["x|8|0.0", "y|8|0.0", "x|8|0.0"]
    assert inner.seen == ["x", "y"]  # identical prompts in one call are paid once
    b = cb.complete(["y", "z"], max_new_tokens=8)
    assert inner.seen == ["x", "y", "z"] and b[0] == a[1]
    cb.complete(["y"], max_new_tokens=9)  # another parameter = another request
    cb.complete(["y"], max_new_tokens=8, temperature=0.5)
    cb.complete([[{"role": "user", "content": "y"}]], max_new_tokens=8)  # chat messages differ from text
    assert len(inner.seen) == 6
    assert cb.stats() == {"paid": 6, "replayed": 2}
    assert cb.counter.snapshot() == {"expert": 8} and inner.counter.snapshot() == {"expert": 6}
    # A fresh process (new connection) replays everything; a different model name does not.
    inner2 = Echo()
    cb2 = CachedBackend(inner2, ResponseCache(tmp_path / "c.sqlite"))
    c = cb2.complete(["x", "z"], max_new_tokens=8)
    assert inner2.seen == [] and c[0].text == "x|8|0.0" and c[0].token_ids == (1, 2)
    inner3 = Echo(model="m2")
    CachedBackend(inner3, ResponseCache(tmp_path / "c.sqlite")).complete(["x"], max_new_tokens=8)
    assert inner3.seen == ["x"]
    # finish_reason survives the round trip; scores are cached too
    assert cb2.complete(["q"], max_new_tokens=2)[0].finish_reason == "length"
    assert cb2.complete(["q"], max_new_tokens=2)[0].finish_reason == "length"
    assert cb2.score(["p", "p"], ["ab", "ab"]) == [-2.0, -2.0] and cb2.score(["p"], ["ab"]) == [-2.0]
    assert inner2.seen == ["q", "p"]


def test_no_secret_in_cache(tmp_path, monkeypatch):
    """The stored rows hold the request and model name only: an API key in the inner client never lands on disk."""
    monkeypatch.setenv("MY_KEY", "sk-secret-123")
    inner = Echo()
    inner.api_key = "sk-secret-123"
    cb = CachedBackend(inner, ResponseCache(tmp_path / "c.sqlite"))
    cb.complete(["hello"], max_new_tokens=4)
    cb.cache.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert b"sk-secret-123" not in raw
    rows = sqlite3.connect(tmp_path / "c.sqlite").execute("SELECT backend, model, request FROM responses").fetchall()
    assert rows[0][0] == "Echo" and rows[0][1] == "m1" and "hello" in rows[0][2]


def test_worker_files_write_own_read_all(tmp_path):
    """Several workers over one cache dir: each writes only its own file; a lookup also reads the other
    workers' files (one that appears after the reader opened) and an older run's single file.

    Mutations tried (each fails here): ``_other_dbs`` returning [] (lookups ignore the others' files),
    listing the other files only once (a worker's file that appears later is missed), skipping
    ``responses.<n>.sqlite`` names; ``paid_by_role`` counting its own file only."""
    from teams_rl_jax.layout import response_cache_file

    legacy = ResponseCache(response_cache_file(tmp_path))  # a single-process run before: WAL, still open
    CachedBackend(Echo(), legacy, tag="data").complete(["old"], max_new_tokens=8)
    w0 = ResponseCache(response_cache_file(tmp_path, 0), read_dir=tmp_path)
    inner0 = Echo()
    cb0 = CachedBackend(inner0, w0, tag="data")
    cb0.complete(["a"], max_new_tokens=8)  # before worker 1's file exists
    w1 = ResponseCache(response_cache_file(tmp_path, 1), read_dir=tmp_path)
    inner1 = Echo()
    CachedBackend(inner1, w1, tag="data").complete(["b", "a"], max_new_tokens=8)
    assert inner1.seen == ["b"]  # "a" was paid by worker 0
    got = cb0.complete(["b", "old", "c"], max_new_tokens=8)
    assert inner0.seen == ["a", "c"] and [c.text for c in got] == ["b|8|0.0", "old|8|0.0", "c|8|0.0"]
    assert (len(legacy), len(w0), len(w1)) == (1, 2, 1)  # each file holds what its own worker paid
    assert w0.paid_by_role("data") == {"expert": 4}  # every worker's paid rows, the old run's included
    for c in (legacy, w0, w1):
        c.close()
