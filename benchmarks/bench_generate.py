"""Prefill and decode throughput: our jitted KV-cache ``generate`` vs ``transformers`` (torch) generate.

One command, both measured in the same run on the same random weights:

    python benchmarks/bench_generate.py            # 4 layers, hidden 512, batch 8, prompt 128, 128 new
    python benchmarks/bench_generate.py --layers 16 --hidden 2048 --batch 16 --no-torch   # e.g. on a GPU

Prefill tokens/s = B*prompt / t(prefill); decode tokens/s = B*(new-1) / (t(generate new) - t(generate 1)).
Times are the best of ``--repeats`` runs after a warm-up (compilation excluded): the minimum is the
estimate least disturbed by other load on a shared machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np


def _best_time(fn, repeats: int) -> float:
    fn()  # warm-up (compile)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    """Parse flags, run both implementations, print a table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-torch", action="store_true", help="skip the transformers reference (e.g. on GPU)")
    args = ap.parse_args()

    from teams_rl_jax import generate
    from teams_rl_jax.models import init, save_pretrained

    hf_cfg = dict(model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden,
                  intermediate_size=int(args.hidden * 8 / 3) // 64 * 64, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
                  initializer_range=0.02)
    lm = init(hf_cfg, jax.random.key(0), dtype=args.dtype)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, args.vocab, size=(args.batch, args.prompt)).astype(np.int32)
    mask = np.ones_like(ids)
    B, P, N = args.batch, args.prompt, args.new

    def ours(n):
        return lambda: np.asarray(generate(lm, lm.params, ids, mask, max_new_tokens=n, rng=jax.random.key(0)))

    rows = []
    t1 = _best_time(ours(1), args.repeats)
    tn = _best_time(ours(N), args.repeats)
    rows.append(("teams_rl_jax (jax)", B * P / t1, B * (N - 1) / (tn - t1)))

    if not args.no_torch:
        import torch
        import transformers

        with tempfile.TemporaryDirectory() as tmp:
            save_pretrained(lm, tmp)
            ref = transformers.AutoModelForCausalLM.from_pretrained(
                tmp, dtype=torch.float32 if args.dtype == "float32" else torch.bfloat16).eval()
        tids, tmask = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask, dtype=torch.long)

        def theirs(n):
            def run():
                with torch.no_grad():
                    ref.generate(input_ids=tids, attention_mask=tmask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
            return run

        r1 = _best_time(theirs(1), args.repeats)
        rn = _best_time(theirs(N), args.repeats)
        rows.append(("transformers (torch)", B * P / r1, B * (N - 1) / (rn - r1)))

    dev = jax.devices()[0]
    print(f"\nconfig: layers={args.layers} hidden={args.hidden} heads={args.heads}/{args.kv_heads} vocab={args.vocab} "
          f"params={lm.num_params() / 1e6:.1f}M dtype={args.dtype} batch={B} prompt={P} new={N}  "
          f"device={dev.platform}:{getattr(dev, 'device_kind', '')}")
    print(f"{'implementation':<24}{'prefill tok/s':>16}{'decode tok/s':>16}")
    for name, pre, dec in rows:
        print(f"{name:<24}{pre:>16,.0f}{dec:>16,.0f}")
    if len(rows) == 2:
        print(f"{'ratio (ours/torch)':<24}{rows[0][1] / rows[1][1]:>15.2f}x{rows[0][2] / rows[1][2]:>15.2f}x")
    if dev.platform == "gpu":
        # Decode is memory bound: each step streams all weights + the KV cache once.
        bytes_per_step = sum(x.nbytes for x in jax.tree_util.tree_leaves(lm.params))
        step_s = B / rows[0][2]
        print(f"weights {bytes_per_step / 1e9:.2f} GB/step -> achieved {bytes_per_step / step_s / 1e9:,.0f} GB/s")


if __name__ == "__main__":
    main()
