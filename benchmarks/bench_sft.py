"""SFT training throughput: our jitted train step vs ``transformers`` + torch AdamW, same model and data.

    python benchmarks/bench_sft.py                       # 4 layers, hidden 512, seq 512, batch 8 (CPU)
    python benchmarks/bench_sft.py --layers 16 --hidden 2048 --heads 16 --kv-heads 16 --vocab 32000 --seq 2048 \
        --batch 8 --dtype bfloat16 --no-torch --peak-tflops 989   # ~1B model, MFU on an H100
    python benchmarks/bench_sft.py --ce-memory           # loss peak memory, seq 2048 x vocab 32000, full vs chunked

Both sides run the same update: next-token cross-entropy on every position, global-norm clipping at
1.0, AdamW; the torch model is loaded from our initial weights through ``save_pretrained``.
tokens/s = batch*seq / step time. The two implementations are timed *alternately* (one step of each
per round, ``--rounds`` >= 5 rounds after a warm-up/compile step); the table (benchmarks/_timing.py)
gives medians, bests, the median and best ratios and the load average before/after.
MFU = 6*N*tokens/s / peak (N = all parameters); "MFU+attn" adds the attention matmuls
(6*L*seq*d per token for causal attention, PaLM's 12*L*seq*d halved by the causal mask).
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleave, load_average, table, timed  # noqa: E402


def ce_memory(seq: int = 2048, vocab: int = 32000, batch: int = 1, hidden: int = 512) -> None:
    """Compiled temp memory of the loss + its gradient (head and CE only), full [B,T,V] logits vs chunked."""
    from teams_rl_jax.sft.step import full_cross_entropy, fused_cross_entropy

    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(batch, seq, hidden)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(hidden, vocab)) * 0.02, jnp.float32)
    t = jnp.asarray(rng.integers(0, vocab, size=(batch, seq)), jnp.int32)
    wt = jnp.ones((batch, seq), jnp.float32)

    def full(h, w):
        return full_cross_entropy(jnp.einsum("btd,dv->btv", h, w), t, wt)

    def chunked(h, w, c):
        return fused_cross_entropy(h, w, t, wt, chunk=c)

    rows = [("full [B,T,V] logits", full)] + [(f"chunked, {c} tokens", lambda h, w, c=c: chunked(h, w, c))
                                              for c in (1024, 256)]
    print(f"\nloss + grad(h, w) peak temp memory (XLA memory_analysis, {jax.devices()[0].platform}), batch={batch} "
          f"seq={seq} vocab={vocab} hidden={hidden}; one [B,T,V] f32 array = {batch * seq * vocab * 4 / 2**20:,.0f} MiB")
    for name, fn in rows:
        m = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(h, w).compile().memory_analysis()
        print(f"{name:<24} temp {m.temp_size_in_bytes / 2**20:>9,.1f} MiB   output {m.output_size_in_bytes / 2**20:>7,.1f} MiB")


def torch_impls(model, ids, tokens: int, args) -> dict:
    """The reference's timed steps: ``{label: fn}``. CPU: eager float32 (the issue-10 reference). CUDA: float32
    master weights, bf16 autocast when ``--dtype bfloat16``, SDPA attention, fused AdamW, the GPU synchronized
    before the clock stops; ``--torch-compile`` adds ``torch.compile(model)`` (same weights and optimizer)."""
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    ref = model.train()
    topt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.0, **({"fused": True} if cuda else {}))
    tids = torch.as_tensor(ids, dtype=torch.long, device=device)
    bf16 = cuda and args.dtype == "bfloat16"

    def make(fwd):
        def theirs():
            def run():
                topt.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                    out = fwd(input_ids=tids, labels=tids)
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
                topt.step()
                if cuda:
                    torch.cuda.synchronize()
            return {"step": tokens / timed(run)}
        return theirs

    if not cuda:
        out = {"transformers + torch AdamW": make(ref)}
    else:
        tag = f"cuda, sdpa{', bf16 autocast' if bf16 else ''}, fused AdamW"
        out = {f"torch eager ({tag})": make(ref)}
    if args.torch_compile:
        out[f"torch.compile {args.torch_compile_mode} ({device})"] = make(torch.compile(ref, mode=args.torch_compile_mode))
    return out


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
    ap.add_argument("--rounds", type=int, default=5, help="timed steps per implementation (interleaved, >= 5)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    ap.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"], help="storage dtype")
    ap.add_argument("--remat", default="none", help="models.llama.REMAT_POLICIES name")
    ap.add_argument("--attention", default="auto", help="ModelConfig.attention_impl (auto|xla|cudnn|splash)")
    ap.add_argument("--unroll", type=int, default=0, help="ModelConfig.scan_unroll: layers per scan step, 0 = all")
    ap.add_argument("--ce-chunk", type=int, default=1024, help="loss chunk in tokens (0 = full [B,T,V] logits)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--torch-compile", action="store_true",
                    help="also time torch.compile(model) (same weights and optimizer as the eager reference)")
    ap.add_argument("--torch-compile-mode", default="default",
                    help="torch.compile mode for --torch-compile (default | max-autotune-no-cudagraphs | ...)")
    ap.add_argument("--ce-memory", action="store_true", help="only print the loss's peak memory, full vs chunked")
    args = ap.parse_args()
    from teams_rl_jax import host_malloc

    malloc = host_malloc.configure()  # what `python -m teams_rl_jax.train` does; TEAMS_RL_JAX_MALLOC=system to compare
    if args.ce_memory:
        ce_memory()
        return

    import dataclasses

    from teams_rl_jax.models import init, save_pretrained
    from teams_rl_jax.sft.config import OptimSection
    from teams_rl_jax.sft.step import init_state, make_optimizer, make_train_step

    cfg = dict(model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden,
               intermediate_size=int(args.hidden * 8 / 3) // 64 * 64, num_hidden_layers=args.layers,
               num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=8192)
    lm = init(cfg, jax.random.key(0), dtype=args.param_dtype, compute_dtype=args.dtype).replace(remat=args.remat)
    lm = lm.replace(config=dataclasses.replace(lm.config, attention_impl=args.attention, scan_unroll=args.unroll))
    B, T = args.batch, args.seq
    rng = np.random.default_rng(0)
    ids = rng.integers(3, args.vocab, size=(B, T)).astype(np.int32)
    batch = {"input_ids": ids, "segment_ids": np.ones_like(ids),
             "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)), "loss_mask": np.ones_like(ids)}
    opt = make_optimizer(OptimSection(lr=1e-4, warmup_steps=0, weight_decay=0.0, clip_norm=1.0), 1000)
    step = jax.jit(make_train_step(lm, opt, ce_chunk=args.ce_chunk), donate_argnums=0)
    batch = jax.device_put(batch)
    device = jax.devices()[0]
    n = lm.num_params()
    tokens = B * T
    torch_model = None
    if not args.no_torch:  # saved before our first step donates the params
        import torch
        import transformers

        cuda = torch.cuda.is_available()
        with tempfile.TemporaryDirectory() as tmp:
            save_pretrained(lm, tmp)
            # float32 master weights on both sides; on CUDA, SDPA attention (torch's flash / memory-efficient kernels)
            torch_model = transformers.AutoModelForCausalLM.from_pretrained(
                tmp, dtype=torch.float32, **({"attn_implementation": "sdpa"} if cuda else {}))
        if cuda:
            torch_model = torch_model.to("cuda")
    # Commit the whole state to the device so the warm-up call's outputs match its inputs (one compile).
    holder = {"state": jax.device_put(init_state(lm, opt, 0), device)}

    faults: list[int] = []  # minor page faults of our step (host_malloc: XLA's temp mapped afresh or not)

    def ours():
        def run():
            holder["state"], m = step(holder["state"], batch)
            jax.block_until_ready(m["loss"])
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        rate = tokens / timed(run)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        return {"step": rate}

    impls = {"teams_rl_jax (jax)": ours}
    refs: list[str] = []
    if torch_model is not None:
        impls.update(torch_impls(torch_model, ids, tokens, args))
        refs = [k for k in impls if k != "teams_rl_jax (jax)"]

    before = load_average()
    results = interleave(impls, args.rounds)
    after = load_average()
    print(f"\nconfig: layers={args.layers} hidden={args.hidden} heads={args.heads}/{args.kv_heads} vocab={args.vocab} "
          f"params={n / 1e6:.1f}M seq={T} batch={B} compute={args.dtype} params={args.param_dtype} remat={args.remat} "
          f"attention={args.attention} unroll={args.unroll} ce_chunk={args.ce_chunk}")
    print(f"device={device.platform}:{getattr(device, 'device_kind', '')} jax={jax.__version__} host_malloc={malloc}")
    for ref in refs or [None]:
        print(table(results, "teams_rl_jax (jax)", ref, before, after))
    print(f"our step: {statistics.median(faults):,.0f} minor page faults (median); process peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (both models)")
    if args.peak_tflops:
        attn = 6 * args.layers * T * args.hidden
        for impl in ["teams_rl_jax (jax)"] + refs:
            med, best = statistics.median(results[impl]["step"]), max(results[impl]["step"])
            for name, rate in (("median", med), ("best", best)):
                print(f"{impl}: MFU ({name}): {6 * n * rate / (args.peak_tflops * 1e12):.1%}   "
                      f"MFU+attn: {(6 * n + attn) * rate / (args.peak_tflops * 1e12):.1%}")


if __name__ == "__main__":
    main()
