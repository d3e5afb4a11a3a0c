"""SFT training throughput: our jitted train step vs ``transformers`` + torch AdamW, same model and data.

    python benchmarks/bench_sft.py                       # 4 layers, hidden 512, seq 512, batch 8 (CPU)
    python benchmarks/bench_sft.py --layers 16 --hidden 2048 --seq 2048 --batch 8 --dtype bfloat16 \
        --remat full --no-torch --peak-tflops 989        # ~1B model, MFU on an H100

tokens/s = batch*seq / step time (best of ``--steps`` after one warm-up step); MFU = 6*N*tokens/s / peak.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np


def _best(fn, steps: int) -> float:
    fn()  # warm-up / compile
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    """Run both trainers on the same random batch and print a table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    ap.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    ap.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()

    from teams_rl_jax.models import init, save_pretrained
    from teams_rl_jax.sft.config import OptimSection
    from teams_rl_jax.sft.step import init_state, make_optimizer, make_train_step

    cfg = dict(model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden,
               intermediate_size=int(args.hidden * 8 / 3) // 64 * 64, num_hidden_layers=args.layers,
               num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=8192)
    lm = init(cfg, jax.random.key(0), dtype="float32", compute_dtype=args.dtype).replace(remat=args.remat)
    B, T = args.batch, args.seq
    rng = np.random.default_rng(0)
    ids = rng.integers(3, args.vocab, size=(B, T)).astype(np.int32)
    batch = {"input_ids": ids, "segment_ids": np.ones_like(ids), "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
             "loss_mask": np.ones_like(ids)}
    opt = make_optimizer(OptimSection(lr=1e-4, warmup_steps=0, weight_decay=0.0), 1000)
    step = jax.jit(make_train_step(lm, opt), donate_argnums=0)
    holder = {"state": init_state(lm, opt, 0)}
    batch = jax.device_put(batch)

    def ours():
        holder["state"], m = step(holder["state"], batch)
        jax.block_until_ready(m["loss"])

    if not args.no_torch:  # build the reference from our weights before our step donates them
        import torch
        import transformers

        with tempfile.TemporaryDirectory() as tmp:
            save_pretrained(lm, tmp)
            ref = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)

    rows = [("teams_rl_jax (jax)", B * T / _best(ours, args.steps))]

    if not args.no_torch:
        ref.train()
        topt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.0)
        tids = torch.as_tensor(ids, dtype=torch.long)

        def theirs():
            topt.zero_grad(set_to_none=True)
            out = ref(input_ids=tids, labels=tids)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
            topt.step()

        rows.append(("transformers + torch AdamW", B * T / _best(theirs, args.steps)))

    n = lm.num_params()
    dev = jax.devices()[0]
    print(f"\nconfig: layers={args.layers} hidden={args.hidden} vocab={args.vocab} params={n / 1e6:.1f}M seq={T} "
          f"batch={B} compute={args.dtype} remat={args.remat} device={dev.platform}:{getattr(dev, 'device_kind', '')}")
    print(f"{'implementation':<28}{'tokens/s':>12}{'MFU':>8}")
    for name, tps in rows:
        mfu = f"{6 * n * tps / (args.peak_tflops * 1e12):.1%}" if args.peak_tflops else "-"
        print(f"{name:<28}{tps:>12,.0f}{mfu:>8}")
    if len(rows) == 2:
        print(f"{'ratio (ours/torch)':<28}{rows[0][1] / rows[1][1]:>11.2f}x")


if __name__ == "__main__":
    main()
