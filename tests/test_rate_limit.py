"""Per-role request and token budgets (``roles.<role>.requests_per_minute`` / ``tokens_per_minute``) and
``max_concurrency``, honoured across threads; virtual time (an injected clock), no real minutes slept.

* ``test_sliding_window_never_exceeded``: 8 threads through one :class:`RateLimiter`; in every sliding
  60 s window the granted requests and tokens stay within the budgets, and the binding budget binds.
* ``test_openai_role_budgets_and_concurrency``: 4 caller threads through one ``openai`` role against
  the fault-injecting server (tests/fault_server.py, a real process): the server never has more than
  ``max_concurrency`` requests in flight (and does reach it), and the budgets stretch the virtual time
  as they must (N requests at R a minute take at least ceil(N / R) - 1 minutes).

Mutations tried: the limiter ignoring tokens (no tpm branch in ``_wait_needed``), ignoring requests (no
rpm branch), a 30 s window (``WINDOW_S``), the backend not calling ``acquire`` before an attempt, a
chat request charged 1 token, ``max_concurrency`` ignored (a pool of 16): each made a test fail. Not
caught, and equivalent: the tpm wait computed from the oldest entry only (the loop re-checks after
the sleep, so the budget still holds; only more wake-ups).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import helpers
from teams_rl_jax.backends.config import RoleConfig
from teams_rl_jax.backends.openai_backend import OpenAIBackend
from teams_rl_jax.backends.ratelimit import RateLimiter, request_tokens

HERE = Path(__file__).parent
SEED = 1234


class VirtualClock:
    """A clock that only moves when someone sleeps (thread-safe)."""

    def __init__(self):
        self.t = 1000.0
        self.lock = threading.Lock()

    def now(self) -> float:
        with self.lock:
            return self.t

    def sleep(self, dt: float) -> None:
        with self.lock:
            self.t += max(dt, 0.0)


def worst_window(events: list[tuple[float, int]], window: float = 60.0) -> tuple[int, int]:
    """The most requests and the most tokens in any window (t - window, t] ending at an event."""
    most_n = most_tok = 0
    for t, _ in events:
        inside = [k for s, k in events if t - window < s <= t]
        most_n, most_tok = max(most_n, len(inside)), max(most_tok, sum(inside))
    return most_n, most_tok


@pytest.mark.parametrize("rpm,tpm", [(30, None), (None, 2000), (25, 4000)])
def test_sliding_window_never_exceeded(rpm, tpm):
    rng = random.Random(SEED)
    clock = VirtualClock()
    lim = RateLimiter(rpm, tpm, clock=clock.now, sleep=clock.sleep)
    sizes = [[rng.randint(20, 400) for _ in range(25)] for _ in range(8)]
    events: list[tuple[float, int]] = []
    lock = threading.Lock()

    def work(mine):
        for n in mine:
            t = lim.acquire(n)
            with lock:
                events.append((t, n))

    threads = [threading.Thread(target=work, args=(s,)) for s in sizes]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(events) == 200
    most_n, most_tok = worst_window(events)
    msg = f"seed {SEED}, rpm {rpm}, tpm {tpm}: worst window {most_n} requests, {most_tok} tokens"
    if rpm is not None:
        assert most_n <= rpm, msg
    if tpm is not None:
        assert most_tok <= tpm, msg
    # The budget binds: the 200 requests could not all go in the first minute.
    elapsed = max(t for t, _ in events) - min(t for t, _ in events)
    need = max(200 / rpm if rpm else 0, sum(map(sum, sizes)) / tpm if tpm else 0)
    assert elapsed >= (int(need) - 1) * 60.0, msg


@pytest.fixture
def server():
    port = helpers.free_port()
    env = {**os.environ, "FAULT_SERVER_KEY": "k-rate"}
    proc = subprocess.Popen([sys.executable, str(HERE / "fault_server.py"), str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield port
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("rpm,tpm", [(10, None), (None, 400)])
def test_openai_role_budgets_and_concurrency(server, monkeypatch, rpm, tpm):
    import json
    import urllib.request

    monkeypatch.setenv("RATE_KEY", "k-rate")
    clock = VirtualClock()
    cfg = RoleConfig(backend="openai", base_url=f"http://127.0.0.1:{server}/v1", model="m", api_key_env="RATE_KEY",
                     max_concurrency=3, requests_per_minute=rpm, tokens_per_minute=tpm, max_retries=0)
    cfg.validate()
    be = OpenAIBackend.from_config(cfg, role="expert", clock=clock.now, sleep=clock.sleep)
    prompts = [[f"plan:wait|t{k}-{i}" for i in range(6)] for k in range(4)]  # 24 requests, 4 caller threads
    out: dict[int, list] = {}

    def call(k):
        out[k] = be.complete(prompts[k], max_new_tokens=90)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
    t0 = clock.now()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    be.close()
    assert [c.text for k in range(4) for c in out[k]] == [f"echo:t{k}-{i}" for k in range(4) for i in range(6)]
    with urllib.request.urlopen(f"http://127.0.0.1:{server}/stats", timeout=10) as r:
        st = json.loads(r.read())
    assert st["requests"] == 24
    assert 2 <= st["max_in_flight"] <= 3, st  # concurrent, never more than max_concurrency
    per = request_tokens(len("plan:wait|t0-0"), 90)
    per_minute = rpm if rpm else tpm // per
    assert clock.now() - t0 >= (-(-24 // per_minute) - 1) * 60.0, (clock.now() - t0, per_minute)
