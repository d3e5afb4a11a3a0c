"""Completion tokens/s of ``python -m teams_rl_jax.serve`` at concurrency 1, 8 and 32, in one run.

Builds a tiny random Llama (+ a byte-level BPE tokenizer) in a temp dir, starts the server as a
subprocess on loopback, warms every batch bucket, then measures interleaved rounds (the order of the
concurrency levels rotates every round, so drifting machine load hits all levels alike). Clients are
this package's ``openai`` backend (threads = concurrency). Greedy, ``max_tokens`` fixed; tokens are
the server's ``usage.completion_tokens`` (rows may stop early at EOS; the count says what was made).

Prints per-round tokens/s, the median and best ratio of c=8 and c=32 over c=1, generate calls per
request, and the load average before/after. Goal (issue 7): c=32 >= 8x c=1.

    python benchmarks/bench_serve.py [--rounds 5] [--max-tokens 32] [--hidden 128] [--layers 2]
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
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--requests", type=int, default=32, help="requests per level per round (>= the concurrency)")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    import httpx

    import helpers
    from hf_models import make_hf_model
    from teams_rl_jax.backends import QueryCounter, RoleConfig, build

    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    tok = helpers.make_tokenizer(tmp / "tok", vocab_size=300)
    _, path = make_hf_model(tmp, "llama3", seed=0, vocab_size=len(tok), hidden_size=args.hidden,
                            intermediate_size=args.hidden * 2, num_hidden_layers=args.layers, num_attention_heads=4,
                            num_key_value_heads=2, initializer_range=0.02)
    tok.save_pretrained(str(path))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "teams_rl_jax.serve", "--checkpoint", str(path), "--port", str(port),
                             "--dtype", "float32", "--max-batch", str(max(levels)), "--batch-wait-ms", "5",
                             "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
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
        print(f"server up in {time.monotonic() - t0:.1f} s")
        clients = {c: build(RoleConfig(backend="openai", base_url=url + "/v1", model=path.name, chat=False,
                                       max_concurrency=c, timeout_s=600, max_retries=0), "bench", QueryCounter())
                   for c in levels}
        words = "alpha beta gamma delta".split()
        prompts = [f"Write item {i}: {words[i % 4]} of the list." for i in range(max(args.requests, max(levels)))]

        def stats():
            return httpx.get(url + "/stats", timeout=30).json()

        def run(c: int, n: int) -> tuple[float, int]:
            before = stats()["completion_tokens"]
            t = time.perf_counter()
            clients[c].complete(prompts[:n], max_new_tokens=args.max_tokens)
            dt = time.perf_counter() - t
            return dt, stats()["completion_tokens"] - before

        # Warm-up: every power-of-two batch bucket the batcher can form, so no round pays a compile.
        t0 = time.monotonic()
        b = 1
        while b <= max(levels):
            warm = build(RoleConfig(backend="openai", base_url=url + "/v1", model=path.name, chat=False,
                                    max_concurrency=b, timeout_s=600, max_retries=0), "warm")
            warm.complete(prompts[:b], max_new_tokens=args.max_tokens)
            b *= 2
        for c in levels:
            run(c, max(c, args.requests))
        print(f"warm-up {time.monotonic() - t0:.1f} s")

        rates: dict[int, list[float]] = {c: [] for c in levels}
        s0 = stats()
        for r in range(args.rounds):
            order = levels[r % len(levels):] + levels[:r % len(levels)]
            line = []
            for c in order:
                dt, toks = run(c, max(c, args.requests))
                rates[c].append(toks / dt)
                line.append(f"c={c}: {toks / dt:8.1f} tok/s ({toks} tok, {dt:.2f} s)")
            print(f"round {r}: " + " | ".join(line), flush=True)
        s1 = stats()
        load_after = os.getloadavg()
        base = rates[levels[0]]
        for c in levels[1:]:
            ratios = [x / y for x, y in zip(rates[c], base)]
            print(f"c={c} vs c={levels[0]}: median ratio {statistics.median(ratios):.2f}x, best {max(ratios):.2f}x "
                  f"(median tok/s {statistics.median(rates[c]):.1f} vs {statistics.median(base):.1f})")
        req = s1["requests"] - s0["requests"]
        calls = s1["generate_calls"] - s0["generate_calls"]
        print(f"{req} requests in {calls} generate calls ({req / max(calls, 1):.1f} requests/call, "
              f"largest batch {s1['max_rows_per_call']})")
        print(f"model: hidden {args.hidden}, layers {args.layers}, vocab {len(tok)}, max_tokens {args.max_tokens}; "
              f"load average before {load_before[0]:.2f}/{load_before[1]:.2f}, after {load_after[0]:.2f}/"
              f"{load_after[1]:.2f}; cpu count {os.cpu_count()}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
