"""A bounded soak of ``python -m teams_rl_jax.serve`` (loopback only; stops by itself), then SIGTERM.

2,000 requests at concurrency 64 over httpx: prompts of every length up to the limit, ``max_tokens``
1..24, greedy and sampled, ``n`` 1..2, completions and chat; one in ten is malformed or over a limit
(not JSON, a wrong type, an unknown model, ``max_tokens`` / prompt / ``n`` / body over their limits).
Asserted: no 5xx; every valid request answered 200 with its choices; every bad one a 4xx with
OpenAI's error body; the server's resident memory grows under 10% from the end of the first quarter
to the end of the run (before continuous batching, a program per ``max_tokens`` value grew it 57%);
p50/p99 latency printed. Then SIGTERM with long requests in flight: each is answered, and the server
exits 0.

Mutations tried: the no-op SIGTERM handler removed from ``serve.__main__`` (uvicorn re-raises the
signal after draining: exit -15, caught); the attention window not bucketed in
``ContinuousEngine._step`` (a program per window width: NOT caught here, RSS +1.7%, every width compiles
in the first quarter; ``test_continuous_batching::test_compiled_programs_stay_bounded_under_any_mix``
catches it).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

import httpx
import pytest

import helpers
from hf_models import make_hf_model

pytestmark = pytest.mark.slow

N_REQUESTS, CONCURRENCY = 2000, 64
MAX_TOKENS, MAX_PROMPT = 24, 256  # the soak asks for 1..MAX_TOKENS
LIMIT_TOKENS = 200  # the server's --max-tokens (the SIGTERM check's long requests ask for all of it)


def _rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _requests(rng, model: str, words: list[str]) -> list[tuple[str, bytes, bool]]:
    """(path, body bytes, valid?) for the whole soak, one in ten invalid."""
    out = []
    for i in range(N_REQUESTS):
        n_words = int(rng.integers(1, 30))
        text = " ".join(rng.choice(words, n_words))
        body = {"model": model, "max_tokens": int(rng.integers(1, MAX_TOKENS + 1)),
                "temperature": float(rng.choice([0.0, 0.0, 0.8])), "n": int(rng.choice([1, 1, 1, 2])),
                "seed": int(rng.integers(0, 1000))}
        chat = bool(rng.integers(0, 2))
        if chat:
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        path = "/v1/chat/completions" if chat else "/v1/completions"
        valid = i % 10 != 3
        if not valid:
            kind = (i // 10) % 7
            if kind == 0:
                raw = b'{"model": "' + model.encode() + b'", "prompt": '  # truncated JSON
                out.append((path, raw, False))
                continue
            if kind == 1:
                body["max_tokens"] = LIMIT_TOKENS + 1 + int(rng.integers(0, 100))
            elif kind == 2:
                body["model"] = "no-such-model"
            elif kind == 3:
                body["n"] = 3
            elif kind == 4:
                body["temperature"] = "hot"
            elif kind == 5:
                long = " ".join(rng.choice(words, 400))
                body["messages" if chat else "prompt"] = [{"role": "user", "content": long}] if chat else long
            else:
                body["padding"] = "x" * 30000  # over --max-body-bytes
        out.append((path, json.dumps(body).encode(), valid))
    return out


def test_soak_2000_mixed_requests_then_sigterm_drains(tmp_path):
    tmp = tmp_path
    tok = helpers.make_tokenizer(tmp / "tok", vocab_size=300)
    _, path = make_hf_model(tmp, "llama3", seed=helpers.seed(21, "torch"), vocab_size=len(tok), initializer_range=0.1)
    tok.save_pretrained(str(path))
    port = helpers.free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "teams_rl_jax.serve", "--checkpoint", str(path), "--port", str(port),
             "--dtype", "float32", "--max-batch", "32", "--max-tokens", str(LIMIT_TOKENS), "--max-prompt-tokens",
             str(MAX_PROMPT), "--max-n", "2", "--max-body-bytes", "20000", "--log-level", "warning"],
            env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.3)
        rng = helpers.rng(22, "soak requests")
        words = "the cat sat on a mat while three blue birds sang near old river stones today".split()
        reqs = _requests(rng, path.name, words)
        results: list = [None] * len(reqs)
        rss: list[tuple[int, float]] = []
        done_count = [0]
        lock = threading.Lock()
        local = threading.local()

        def one(i: int):
            if not hasattr(local, "client"):
                local.client = httpx.Client(timeout=300)
            p, body, _ = reqs[i]
            t = time.perf_counter()
            r = local.client.post(url + p, content=body, headers={"content-type": "application/json"})
            results[i] = (r.status_code, r.json() if r.headers.get("content-type", "").startswith("application/json")
                          else None, time.perf_counter() - t)
            with lock:
                done_count[0] += 1
                if done_count[0] % 100 == 0:
                    rss.append((done_count[0], _rss_mib(proc.pid)))

        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(one, range(len(reqs))))
        wall = time.monotonic() - t0

        statuses = [r[0] for r in results]
        assert not [s for s in statuses if s >= 500], log.read_text()[-3000:]
        bad = []
        for (p, body, valid), (status, js, _) in zip(reqs, results):
            if valid:
                want_n = json.loads(body)["n"]
                if status != 200 or len(js["choices"]) != want_n:
                    bad.append((status, body[:120], js))
            elif not (400 <= status < 500 and js and "message" in js.get("error", {})):
                bad.append((status, body[:120], js))
        assert not bad, bad[:5]
        lat = sorted(r[2] for (_, _, v), r in zip(reqs, results) if v)
        q1 = [m for n, m in rss if n <= N_REQUESTS // 4][-1]
        last = rss[-1][1]
        print(f"\nsoak: {len(reqs)} requests ({sum(not v for *_, v in reqs)} invalid) at concurrency {CONCURRENCY} in "
              f"{wall:.1f} s; valid p50 {statistics.median(lat) * 1000:.0f} ms, p99 "
              f"{lat[int(0.99 * len(lat))] * 1000:.0f} ms; RSS MiB after Q1 {q1:.0f}, end {last:.0f} "
              f"({(last / q1 - 1) * 100:+.1f}%); load {os.getloadavg()[0]:.1f}")
        assert last < 1.10 * q1, f"RSS grew {q1:.0f} -> {last:.0f} MiB over the soak"

        # SIGTERM with long requests in flight: every one is answered, then the server exits 0.
        def long_request(k):
            with httpx.Client(timeout=300) as c:
                return c.post(url + "/v1/completions", json={"model": path.name, "prompt": f"item {k}",
                                                              "max_tokens": LIMIT_TOKENS, "temperature": 0})

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futs = [pool.submit(long_request, k) for k in range(8)]
            t0 = time.monotonic()
            while httpx.get(url + "/stats", timeout=30).json()["rows_in_flight"] < 8:
                assert time.monotonic() - t0 < 60, "the long requests never reached the engine"
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in futs]
        assert [a.status_code for a in answers] == [200] * 8
        assert all(a.json()["usage"]["completion_tokens"] >= 1 for a in answers)
        assert proc.wait(timeout=60) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
