"""Continuous-batching engine (``FlaxBackend.generate_ids``) vs static batched ``generate``, same model, one run.

Two workloads, each run by both, interleaved over ``--rounds`` rounds (median ratio printed):

* **uniform**: ``--batch`` prompts of ``--prompt`` tokens, ``--new`` tokens each (no EOS): the static
  generate's best case; the engine pays its per-chunk host round trips and per-row cache writes.
* **mixed**: ``4 x --batch`` prompts, a quarter asking for ``--new`` tokens and the rest ``--new / 8``:
  static generate runs ``--batch`` rows at a time to the longest row of each chunk (what the server and
  the backend did before continuous batching); the engine refills a slot as soon as its row ends.

Tokens counted are the requested ones (no EOS). Weights random (``models.init``), greedy.

    python benchmarks/bench_engine.py [--layers 4 --hidden 512 --batch 8 --prompt 64 --new 128 --rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--chunk", type=int, default=8, help="the engine's decode chunk")
    args = ap.parse_args()

    from teams_rl_jax import generate
    from teams_rl_jax.backends.flax_backend import FlaxBackend
    from teams_rl_jax.env.seeds import offline_tokenizer
    from teams_rl_jax.models import init

    cfg = dict(model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden,
               intermediate_size=int(args.hidden * 8 / 3) // 64 * 64, num_hidden_layers=args.layers,
               num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
               initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    lm = init(cfg, jax.random.key(0), dtype=args.dtype)
    tok = offline_tokenizer(["a b c d e f g"])
    be = FlaxBackend.from_lm(lm, tok, role="bench", max_batch=args.batch, eos_ids=(), decode_chunk=args.chunk)
    rng = np.random.default_rng(0)
    B, P, N = args.batch, args.prompt, args.new

    def prompts(n):
        return [rng.integers(3, args.vocab, P).tolist() for _ in range(n)]

    uniform = (prompts(B), [N] * B)
    mixed_p = prompts(4 * B)
    mixed_lim = [N if i % 4 == 0 else max(1, N // 8) for i in range(4 * B)]
    rng.shuffle(mixed_lim)
    mixed = (mixed_p, [int(x) for x in mixed_lim])

    def static(work):
        ps, lims = work
        for s in range(0, len(ps), B):
            ids = np.asarray(ps[s:s + B], np.int32)
            out = generate(lm, lm.params, ids, np.ones_like(ids), max_new_tokens=max(lims[s:s + B]),
                           rng=jax.random.key(0))
            np.asarray(out)
        return sum(lims)

    def engine(work):
        ps, lims = work
        be.generate_ids(ps, max_new_tokens=lims)
        return sum(lims)

    def timed(fn, work):
        t = time.perf_counter()
        n = fn(work)
        return n / (time.perf_counter() - t)

    load0 = os.getloadavg()
    for work in (uniform, mixed):  # compile everything once
        static(work), engine(work)
    res = {k: {"static": [], "engine": []} for k in ("uniform", "mixed")}
    for r in range(args.rounds):
        for name, work in (("uniform", uniform), ("mixed", mixed)):
            order = ("static", "engine") if r % 2 == 0 else ("engine", "static")
            for who in order:
                res[name][who].append(timed(static if who == "static" else engine, work))
    load1 = os.getloadavg()
    print(f"model: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, {args.dtype}; batch/slots {B}, "
          f"prompt {P}, new {N} (mixed: a quarter {N}, the rest {max(1, N // 8)}), chunk {args.chunk}, "
          f"{args.rounds} rounds, {jax.devices()[0].platform}")
    for name in ("uniform", "mixed"):
        s, e = res[name]["static"], res[name]["engine"]
        ratios = [a / b for a, b in zip(e, s)]
        print(f"{name:8s}: engine {statistics.median(e):9.1f} tok/s, static generate {statistics.median(s):9.1f} tok/s;"
              f" engine/static median {statistics.median(ratios):.3f}, best {max(ratios):.3f}")
    print(f"load average before {load0[0]:.2f} {load0[1]:.2f}, after {load1[0]:.2f} {load1[1]:.2f}; "
          f"cpu count {os.cpu_count()}")


if __name__ == "__main__":
    main()
