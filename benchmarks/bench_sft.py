"""SFT training throughput: our jitted train step vs ``transformers`` + torch AdamW, same model and data.

    python benchmarks/bench_sft.py                       # 4 layers, hidden 512, seq 512, batch 8 (CPU)
    python benchmarks/bench_sft.py --layers 16 --hidden 2048 --seq 2048 --batch 8 --dtype bfloat16 \
        --remat full --no-torch --peak-tflops 989        # ~1B model, MFU on an H100

Both sides run the same update: next-token cross-entropy on every position, global-norm clipping at
1.0, AdamW; the torch model is loaded from our initial weights through ``save_pretrained``.
tokens/s = batch*seq / step time. The two implementations are timed *alternately* (one step of each
per round, ``--rounds`` rounds after a warm-up/compile step) and the best round of each is reported,
with the median next to it: on a shared machine other load comes and goes, and interleaving exposes
both sides to the same conditions. MFU = 6*N*tokens/s / peak (N = all parameters).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import jax
import numpy as np


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
    ap.add_argument("--rounds", type=int, default=5, help="timed steps per implementation (interleaved)")
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
    batch = {"input_ids": ids, "segment_ids": np.ones_like(ids),
             "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)), "loss_mask": np.ones_like(ids)}
    opt = make_optimizer(OptimSection(lr=1e-4, warmup_steps=0, weight_decay=0.0, clip_norm=1.0), 1000)
    step = jax.jit(make_train_step(lm, opt), donate_argnums=0)
    batch = jax.device_put(batch)
    device = jax.devices()[0]
    # Commit the whole state to the device so the warm-up call's outputs match its inputs (one compile).
    holder = {"state": jax.device_put(init_state(lm, opt, 0), device)}

    def ours():
        holder["state"], m = step(holder["state"], batch)
        jax.block_until_ready(m["loss"])

    impls = [("teams_rl_jax (jax)", ours)]
    if not args.no_torch:  # the reference starts from our weights (saved before our step donates them)
        import torch
        import transformers

        with tempfile.TemporaryDirectory() as tmp:
            save_pretrained(lm, tmp)
            ref = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        ref.train()
        topt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.0)
        tids = torch.as_tensor(ids, dtype=torch.long)

        def theirs():
            topt.zero_grad(set_to_none=True)
            out = ref(input_ids=tids, labels=tids)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
            topt.step()

        impls.append(("transformers + torch AdamW", theirs))

    times: dict[str, list[float]] = {name: [] for name, _ in impls}
    for _, fn in impls:
        fn()  # warm-up (compilation, allocator)
    for _ in range(args.rounds):
        for name, fn in impls:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    n = lm.num_params()
    tokens = B * T
    print(f"\nconfig: layers={args.layers} hidden={args.hidden} heads={args.heads}/{args.kv_heads} vocab={args.vocab} "
          f"params={n / 1e6:.1f}M seq={T} batch={B} compute={args.dtype} remat={args.remat}")
    print(f"machine: {platform.machine()} {device.platform}:{getattr(device, 'device_kind', '')} "
          f"cores={__import__('os').cpu_count()} jax={jax.__version__} rounds={args.rounds}")
    print(f"{'implementation':<28}{'best tok/s':>12}{'median tok/s':>14}{'MFU':>8}")
    best = {}
    for name, ts in times.items():
        best[name] = tokens / min(ts)
        mfu = f"{6 * n * best[name] / (args.peak_tflops * 1e12):.1%}" if args.peak_tflops else "-"
        print(f"{name:<28}{best[name]:>12,.0f}{tokens / statistics.median(ts):>14,.0f}{mfu:>8}")
    if len(best) == 2:
        a, b = best.values()
        med = [tokens / statistics.median(ts) for ts in times.values()]
        print(f"{'ratio (ours/torch)':<28}{a / b:>11.2f}x{med[0] / med[1]:>13.2f}x")


if __name__ == "__main__":
    main()
