"""The GEMM ceiling under the CPU ratios: XLA:CPU's matmuls vs torch's, at the SFT benchmark's shapes.

    python benchmarks/bench_gemm.py                      # tokens 4096, hidden 512, mlp 1344, float32
    python benchmarks/bench_gemm.py --tokens 4096 --hidden 512 --mlp 1344 --dtype bfloat16

Matmuls are ~75% of our SFT step's busy time on CPU (a jax.profiler trace of bench_sft.py's step), so
the step's ratio to torch cannot sit far above the ratio of the matmuls themselves: this script
measures that ceiling on the machine at hand, one jitted dot against one torch matmul, for the three
forms a dense layer's training step runs:

* ``NN  x @ W``    the forward projection            [tokens, hidden] x [hidden, mlp]
* ``NT  dy @ W.T`` the input gradient                [tokens, mlp] x [mlp, hidden]
* ``TN  x.T @ dy`` the weight gradient (contracts tokens) [hidden, tokens] x [tokens, mlp]

Both sides use the process's default threads; timings alternate per round (benchmarks/_timing.py)
and the table reports GFLOP/s medians and bests, the median and best ratios, load and steal.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleave, load_average, table, timed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="batch x seq of bench_sft.py's default step")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--mlp", type=int, default=1344)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--reps", type=int, default=5, help="matmuls per timed measurement")
    args = ap.parse_args()
    from teams_rl_jax import host_malloc

    malloc = host_malloc.configure()  # as bench_sft.py
    import torch

    M, K, N = args.tokens, args.hidden, args.mlp
    rng = np.random.default_rng(0)
    x, w, dy = (rng.normal(size=s).astype(np.float32) for s in ((M, K), (K, N), (M, N)))
    jdt, tdt = jnp.dtype(args.dtype), getattr(torch, args.dtype)
    jx, jw, jdy = (jnp.asarray(a, jdt) for a in (x, w, dy))
    tx, tw, tdy = (torch.from_numpy(a).to(tdt) for a in (x, w, dy))
    forms = {  # name: (jax fn, its args, torch fn)
        "NN": (jax.jit(lambda a, b: a @ b), (jx, jw), lambda: tx @ tw),
        "NT": (jax.jit(lambda a, b: a @ b.T), (jdy, jw), lambda: tdy @ tw.T),
        "TN": (jax.jit(lambda a, b: a.T @ b), (jx, jdy), lambda: tx.T @ tdy),
    }
    gflop = 2 * M * K * N / 1e9 * args.reps

    def ours():
        out = {}
        for name, (fn, a, _) in forms.items():
            out[name] = gflop / timed(lambda fn=fn, a=a: [fn(*a).block_until_ready() for _ in range(args.reps)])
        return out

    def theirs():
        out = {}
        with torch.no_grad():
            for name, (_, _, fn) in forms.items():
                out[name] = gflop / timed(lambda fn=fn: [fn() for _ in range(args.reps)])
        return out

    before = load_average()
    results = interleave({"jax (XLA:CPU)": ours, "torch": theirs}, args.rounds)
    after = load_average()
    print(f"\nM={M} K={K} N={N} dtype={args.dtype} reps={args.reps} device={jax.devices()[0].platform} "
          f"jax={jax.__version__} torch={torch.__version__} threads={torch.get_num_threads()} host_malloc={malloc}")
    print(table(results, "jax (XLA:CPU)", "torch", before, after, unit="GFLOP/s"))


if __name__ == "__main__":
    main()
