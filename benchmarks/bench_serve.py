"""``python -m teams_rl_jax.serve`` under mixed answer lengths at concurrency 1, 8, 32 and 64, in one run.

Builds a tiny random Llama (+ a byte-level BPE tokenizer) in a temp dir, starts the server as a
subprocess on loopback, warms it up, then measures interleaved rounds (the order of the concurrency
levels rotates every round, so drifting machine load hits all levels alike). Each level sends
``--requests`` requests from ``c`` client threads (httpx, one connection each); one in four is SHORT
(``--short-tokens``), the rest LONG (``--max-tokens``), greedy, EOS never reached in practice (tokens
are the server's ``usage.completion_tokens``, so early stops are counted as what was made).

Prints per level: completion tokens/s, and the p50/p99 latency of the short requests; the median
ratio of each level's throughput over c=1; a short request's latency alone (sent with nothing else
in flight) against its p50 under load; decode chunks per request; load average before/after.
Goals (issue 19, on the GPU with the 512-wide model): c=32 >= 12x c=1; short p50 under load <= 3x
alone. With continuous batching a short request joins free slots between decode chunks and returns
when it ends, so it is not held behind the long ones.

    python benchmarks/bench_serve.py [--rounds 3] [--max-tokens 64] [--hidden 128] [--layers 2]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tiny HF models + tokenizer builders shared with the tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64, help="long requests' max_tokens")
    ap.add_argument("--short-tokens", type=int, default=4, help="short requests' max_tokens")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--levels", default="1,8,32,64")
    ap.add_argument("--requests", type=int, default=64, help="requests per level per round (>= the concurrency)")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    import concurrent.futures
    import threading

    import httpx

    import helpers
    from hf_models import make_hf_model

    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    tok = helpers.make_tokenizer(tmp / "tok", vocab_size=300)
    _, path = make_hf_model(tmp, "llama3", seed=0, vocab_size=len(tok), hidden_size=args.hidden,
                            intermediate_size=args.hidden * 2, num_hidden_layers=args.layers, num_attention_heads=4,
                            num_key_value_heads=2, initializer_range=0.02, max_position_embeddings=1024)
    tok.save_pretrained(str(path))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "teams_rl_jax.serve", "--checkpoint", str(path), "--port", str(port),
                             "--dtype", args.dtype, "--max-batch", str(max(levels)), "--log-level", "warning",
                             # every prefill/decode program these (greedy) requests can need, compiled before serving
                             "--warmup", "--warmup-sampling", "greedy", "--max-prompt-tokens", "64",
                             "--max-tokens", str(max(args.max_tokens, args.short_tokens))],
                            stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise SystemExit((tmp / "server.log").read_text()[-2000:])
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        print(f"server up in {time.monotonic() - t0:.1f} s (its --warmup compiles included)")
        words = "alpha beta gamma delta".split()
        n_req = max(args.requests, max(levels))
        prompts = [f"Write item {i}: {words[i % 4]} of the list." for i in range(n_req)]
        local = threading.local()

        def post(prompt: str, max_tokens: int) -> tuple[float, int]:
            if not hasattr(local, "client"):
                local.client = httpx.Client(timeout=600)
            t = time.perf_counter()
            r = local.client.post(url + "/v1/completions", json={"model": path.name, "prompt": prompt,
                                                                 "max_tokens": max_tokens, "temperature": 0})
            r.raise_for_status()
            return time.perf_counter() - t, r.json()["usage"]["completion_tokens"]

        def stats():
            return httpx.get(url + "/stats", timeout=30).json()

        def run(c: int) -> tuple[float, list[float]]:
            """(completion tokens/s, short requests' latencies) of one level."""
            short = [i % 4 == 0 for i in range(n_req)]
            with concurrent.futures.ThreadPoolExecutor(c) as pool:
                t = time.perf_counter()
                res = list(pool.map(lambda i: post(prompts[i], args.short_tokens if short[i] else args.max_tokens),
                                    range(n_req)))
                dt = time.perf_counter() - t
            return sum(n for _, n in res) / dt, [lat for (lat, _), s in zip(res, short) if s]

        def alone() -> float:
            return statistics.median(post(prompts[0], args.short_tokens)[0] for _ in range(5))

        t0 = time.monotonic()
        for c in levels:  # warm-up of the HTTP path and the client threads (the server compiled at start)
            run(c)
        alone()
        print(f"warm-up {time.monotonic() - t0:.1f} s")

        rates: dict[int, list[float]] = {c: [] for c in levels}
        shorts: dict[int, list[float]] = {c: [] for c in levels}
        alone_lat = []
        s0 = stats()
        for r in range(args.rounds):
            order = levels[r % len(levels):] + levels[:r % len(levels)]
            line = []
            alone_lat.append(alone())
            for c in order:
                rate, lat = run(c)
                rates[c].append(rate)
                shorts[c].extend(lat)
                line.append(f"c={c}: {rate:8.1f} tok/s")
            print(f"round {r}: " + " | ".join(line) + f" | short alone {alone_lat[-1] * 1000:.1f} ms", flush=True)
        s1 = stats()
        load_after = os.getloadavg()
        base = rates[levels[0]]
        a = statistics.median(alone_lat)
        print(f"short request alone: p50 {a * 1000:.1f} ms")
        for c in levels:
            lat = sorted(shorts[c])
            p50, p99 = statistics.median(lat), lat[min(len(lat) - 1, int(0.99 * len(lat)))]
            ratios = [x / y for x, y in zip(rates[c], base)]
            print(f"c={c:3d}: {statistics.median(rates[c]):9.1f} tok/s (median), {statistics.median(ratios):5.2f}x c=1; "
                  f"short p50 {p50 * 1000:7.1f} ms ({p50 / a:4.1f}x alone), p99 {p99 * 1000:7.1f} ms")
        req = s1["requests"] - s0["requests"]
        calls = s1["batches"] - s0["batches"]
        print(f"{req} requests in {calls} decode chunks ({req / max(calls, 1):.2f} requests/chunk, "
              f"most rows in one chunk {s1['max_rows_per_call']})")
        print(f"model: hidden {args.hidden}, layers {args.layers}, vocab {len(tok)}, {args.dtype}, long {args.max_tokens} "
              f"/ short {args.short_tokens} tokens; load average before {load_before[0]:.2f}/{load_before[1]:.2f}, "
              f"after {load_after[0]:.2f}/{load_after[1]:.2f}; cpu count {os.cpu_count()}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
