"""Prefill and decode throughput: our jitted KV-cache ``generate`` vs ``transformers`` (torch) generate.

One command, both measured in the same run on the same random weights, interleaved over ``--rounds``:

    python benchmarks/bench_generate.py            # 4 layers, hidden 512, batch 8, prompt 128, 128 new (CPU)
    python benchmarks/bench_generate.py --layers 16 --hidden 2048 --batch 16 --dtype bfloat16 --no-torch  # ~1B, GPU

Per round: prefill tokens/s = B*prompt / t(generate 1 token); decode tokens/s = B*(new-1) /
(t(generate new) - t(generate 1)). The table (benchmarks/_timing.py) gives medians, bests, the median
and best ratios and the load average before/after. On a GPU it also prints decode's bytes per step
(weights + the KV cache read) and the achieved fraction of the HBM bandwidth bound. ``--profile-dir DIR``
then traces one call of ours and prints where a decode step's device time goes (``_profile.py``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleave, load_average, table, timed  # noqa: E402


def _require_compiled(run, label: str) -> None:
    """Run ``run`` once (the compiled variant's warm-up) and stop if transformers skipped the compile: it only
    logs a warning and generates eagerly, which would put an eager figure under a compiled label."""
    import logging

    class Skipped(logging.Handler):
        seen = False

        def emit(self, record):
            Skipped.seen |= "unable to meet the criteria for compilation" in record.getMessage()

    logger, handler = logging.getLogger("transformers.generation.utils"), Skipped()
    logger.addHandler(handler)
    try:
        run()
    finally:
        logger.removeHandler(handler)
    if Skipped.seen:
        raise SystemExit(f"{label}: transformers skipped torch.compile (compile criteria not met); not timed")


def torch_impls(lm, ids, mask, args) -> dict:
    """The transformers references, ``{label: fn}`` (each fn -> ``{"prefill", "decode"}`` tokens/s).

    Variants (``--torch-variants``; default ``dynamic`` on the CPU, ``static,static-compiled`` on CUDA):
    ``dynamic``: ``generate`` with the default dynamic cache, eager (the issue-10 CPU reference); prefill =
    generate 1 token. ``static``: ``generate`` with the static KV cache (``cache_implementation="static"``), eager
    (``disable_compile=True``: transformers would otherwise auto-compile with its reduce-overhead recipe).
    ``static-compiled``: the same, compiled (``compile_config`` with ``--torch-compile-mode``). The static variants'
    prefill is one HF forward over batch x prompt (``logits_to_keep=1``, as our prefill keeps the last position).
    On CUDA: SDPA attention, the GPU synchronized before every clock stop. Named explicitly, every variant also
    runs on the CPU (``SMOKE=1 benchmarks/gpu_figures.sh`` runs the GPU command set that way)."""
    import torch
    import transformers

    from teams_rl_jax.models import save_pretrained

    cuda = torch.cuda.is_available()
    B, P, N = args.batch, args.prompt, args.new
    tdtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(lm, tmp)
        ref = transformers.AutoModelForCausalLM.from_pretrained(
            tmp, dtype=tdtype, **({"attn_implementation": "sdpa"} if cuda else {})).eval()
    device = "cuda" if cuda else "cpu"
    ref = ref.to(device)
    tids = torch.as_tensor(ids, dtype=torch.long, device=device)
    tmask = torch.as_tensor(mask, dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def gen_once(n, **kw):
        def run():
            with torch.no_grad():
                ref.generate(input_ids=tids, attention_mask=tmask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0, **kw)
            sync()
        return timed(run)

    def forward_once():
        def run():
            with torch.no_grad():
                ref(input_ids=tids, attention_mask=tmask, logits_to_keep=1)
            sync()
        return timed(run)

    def dynamic():
        t1, tn = gen_once(1), gen_once(N)
        return {"prefill": B * P / t1, "decode": B * (N - 1) / (tn - t1) if tn > t1 else float("nan")}

    variants = args.torch_variants or ("static,static-compiled" if cuda else "dynamic")
    out = {}
    for variant in [v.strip() for v in variants.split(",") if v.strip()]:
        if variant == "dynamic":
            out["transformers (torch)" if not cuda else "HF generate dynamic cache (eager)"] = dynamic
            continue
        if variant == "static":
            kw, label = {"cache_implementation": "static", "disable_compile": True}, "HF generate static cache (eager)"
        elif variant == "static-compiled":
            cc = transformers.CompileConfig(mode=args.torch_compile_mode, fullgraph=True)
            if not cuda:  # transformers compiles on accelerators only, unless told (its testing switch)
                cc._compile_all_devices = True
            kw = {"cache_implementation": "static", "compile_config": cc}
            label = f"HF generate static cache (torch.compile {args.torch_compile_mode})"
            _require_compiled(lambda kw=kw: gen_once(2, **kw), label)
        else:
            raise SystemExit(f"--torch-variants: unknown {variant!r}")

        def theirs(kw=kw):
            t1, tn = gen_once(1, **kw), gen_once(N, **kw)
            return {"prefill": B * P / forward_once(), "decode": B * (N - 1) / (tn - t1) if tn > t1 else float("nan")}
        out[label] = theirs
    return out


def main() -> None:
    """Parse flags, run both implementations interleaved, print one table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--attention", default="auto", help="ModelConfig.attention_impl (auto|xla|cudnn|splash)")
    ap.add_argument("--unroll", type=int, default=0, help="ModelConfig.scan_unroll: layers per scan step, 0 = all")
    ap.add_argument("--hbm-gbps", type=float, default=3350.0, help="HBM bandwidth for the decode bound (H100 SXM)")
    ap.add_argument("--no-torch", action="store_true", help="skip the transformers reference")
    ap.add_argument("--torch-compile-mode", default="default",
                    help="torch.compile mode of the compiled HF reference (default | max-autotune-no-cudagraphs; "
                         "reduce-overhead is opt-in: transformers' CUDA-graph recipe failed on an H200 with a graph "
                         "buffer overwritten in the static cache)")
    ap.add_argument("--torch-variants", default=None,
                    help="HF references to time, comma-separated: dynamic (generate, dynamic cache, eager; the CPU "
                         "default), static (static KV cache, eager), static-compiled (same, compiled with "
                         "--torch-compile-mode); default on CUDA: static,static-compiled")
    ap.add_argument("--profile-dir", default=None,
                    help="after the timed rounds, trace one call of ours with --new tokens and one with 1 under the "
                         "JAX profiler, keep both traces here (.xplane.pb and .gz) and print the device time per "
                         "decode step: kernels, busy and idle time, device-to-host copies, the costliest kernels")
    args = ap.parse_args()
    from teams_rl_jax import host_malloc

    malloc = host_malloc.configure()  # what the CLI entry points do; TEAMS_RL_JAX_MALLOC=system to compare
    import dataclasses

    from teams_rl_jax import generate
    from teams_rl_jax.models import init

    hf_cfg = dict(model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden,
                  intermediate_size=int(args.hidden * 8 / 3) // 64 * 64, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
                  initializer_range=0.02)
    lm = init(hf_cfg, jax.random.key(0), dtype=args.dtype)
    lm = lm.replace(config=dataclasses.replace(lm.config, attention_impl=args.attention, scan_unroll=args.unroll))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, args.vocab, size=(args.batch, args.prompt)).astype(np.int32)
    mask = np.ones_like(ids)
    B, P, N = args.batch, args.prompt, args.new

    def ours_once(n):
        return timed(lambda: np.asarray(generate(lm, lm.params, ids, mask, max_new_tokens=n, rng=jax.random.key(0))))

    def ours():
        t1, tn = ours_once(1), ours_once(N)
        return {"prefill": B * P / t1, "decode": B * (N - 1) / (tn - t1) if tn > t1 else float("nan")}

    impls = {"teams_rl_jax (jax)": ours}
    if not args.no_torch:
        impls.update(torch_impls(lm, ids, mask, args))
    refs = [k for k in impls if k != "teams_rl_jax (jax)"]

    before = load_average()
    results = interleave(impls, args.rounds)
    after = load_average()
    dev = jax.devices()[0]
    print(f"\nconfig: layers={args.layers} hidden={args.hidden} heads={args.heads}/{args.kv_heads} vocab={args.vocab} "
          f"params={lm.num_params() / 1e6:.1f}M dtype={args.dtype} batch={B} prompt={P} new={N} "
          f"attention={args.attention} unroll={args.unroll} device={dev.platform}:{getattr(dev, 'device_kind', '')} "
          f"jax={jax.__version__} host_malloc={malloc}")
    for ref in refs or [None]:
        print(table(results, "teams_rl_jax (jax)", ref, before, after))
    if dev.platform == "gpu":
        # Decode is memory bound: a step streams every weight once plus the KV cache written so far.
        import statistics

        weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(lm.params))
        c = lm.config
        itemsize = np.dtype(lm.dtype).itemsize
        kv_mean = 2 * c.num_hidden_layers * B * (P + N / 2) * c.num_key_value_heads * c.head_dim * itemsize
        moved = weights + kv_mean
        print(f"decode: {weights / 1e9:.2f} GB weights + {kv_mean / 1e9:.2f} GB mean KV cache per step "
              f"(HBM bound {args.hbm_gbps:,.0f} GB/s -> {moved / args.hbm_gbps / 1e6:.2f} ms/step)")
        for impl in ["teams_rl_jax (jax)"] + refs:
            step_s = B / statistics.median(results[impl]["decode"])
            print(f"  {impl}: {step_s * 1e3:.2f} ms/step -> {moved / step_s / 1e9:,.0f} GB/s = "
                  f"{moved / step_s / 1e9 / args.hbm_gbps:.0%} of the bound")
    if args.profile_dir:
        import _profile
        from jax.profiler import ProfileData

        full, base = (_profile.device_stats(ProfileData.from_serialized_xspace(
            _profile.trace(lambda n=n: ours_once(n), args.profile_dir, f"decode_b{B}_n{n}")).planes) for n in (N, 1))
        print(f"profile of ours, batch {B}: generate {N} minus generate 1 ({N - 1} decode steps); traces in "
              f"{args.profile_dir}/decode_b{B}_n{{{N},1}}.xplane.pb.gz")
        print("\n".join(_profile.summarize(full, base, N - 1)))


if __name__ == "__main__":
    main()
