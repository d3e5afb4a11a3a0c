"""LoRA SFT of a Llama-2-7B-shaped model on one accelerator: peak device memory and step time.

Random bf16 weights (no checkpoint needed; the step's cost does not depend on the values). The base is
frozen in ``TrainState.frozen``, the adapters (rank ``--rank`` on all seven projections) and their f32 Adam
moments are the only optimizer state. Prints one JSON line: peak bytes in use (``memory_stats``), the
compiled step's own memory analysis, tokens/s and MFU (4 N FLOPs per token: no weight gradient for the base).

    python benchmarks/bench_lora_7b.py --batch 8 --seq 512 --remat full      # on a GPU
    python benchmarks/bench_lora_7b.py --quantize nf4                        # QLoRA: the base in 4 bits
    python benchmarks/bench_lora_7b.py --compile-only [--quantize nf4]       # any machine: XLA's memory analysis
    python benchmarks/bench_lora_7b.py --layers 2 --hidden 256 --inter 704 --heads 4 --vocab 1000  # CPU smoke

``--compile-only`` builds nothing but shapes (no weights allocated): it compiles the step for the default
backend and prints the compiled step's argument / temp / output bytes, so the 7B arithmetic can be checked
on a CPU. (Temp sizes are the backend's own: a CPU compile fuses differently from a GPU one.)
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--remat", default="full")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--quantize", default="none", choices=["none", "nf4"])
    ap.add_argument("--compile-only", action="store_true")
    args = ap.parse_args(argv)

    from teams_rl_jax.models import init
    from teams_rl_jax.sft import lora
    from teams_rl_jax.sft.config import LoraSection, OptimSection
    from teams_rl_jax.sft.step import TrainState, init_state, make_optimizer, make_train_step

    cfg = dict(model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
               num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
               max_position_embeddings=4096, rms_norm_eps=1e-5, initializer_range=0.02)
    spec = LoraSection(rank=args.rank, alpha=2.0 * args.rank, dropout=0.05, quantize=args.quantize)
    from teams_rl_jax.models import LM
    from teams_rl_jax.models.config import ModelConfig
    from teams_rl_jax.models.lm import abstract_params

    model = LM(ModelConfig.from_dict(cfg), None, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat=args.remat,
               lora=spec)
    opt = make_optimizer(OptimSection(lr=1e-4, warmup_steps=0), 1000)
    B, T = args.batch, args.seq
    if args.compile_only:  # shapes only: nothing is allocated
        lm = model.replace(params=abstract_params(model.config, "bfloat16"))
        n_base = lm.num_params()
        adapters = jax.eval_shape(lambda: lora.init_adapters(lm, spec, jax.random.key(1)))
        frozen = (jax.eval_shape(lambda p: lora.quantize_base(lm.replace(params=p), spec)[0], lm.params)
                  if args.quantize == "nf4" else lm.params)
        state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=adapters,
                           opt_state=jax.eval_shape(opt.init, adapters), frozen=frozen,
                           rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))))
        i32 = jax.ShapeDtypeStruct((B, T), jnp.int32)
        batch = {"input_ids": i32, "segment_ids": i32, "positions": i32, "loss_mask": i32}
    else:
        lm = init(cfg, jax.random.key(0), dtype="bfloat16").replace(lora=spec, remat=args.remat)
        n_base = lm.num_params()
        adapters = lora.init_adapters(lm, spec, jax.random.key(1))
        frozen = lora.quantize_base(lm, spec)[0] if args.quantize == "nf4" else lm.params
        state = init_state(lm.replace(params=adapters), opt, 0).replace(frozen=frozen)
        del lm, frozen  # the state holds the base now (the bf16 one is freed when quantized)
        rng = np.random.default_rng(0)
        batch = {"input_ids": jnp.asarray(rng.integers(3, args.vocab, (B, T)), jnp.int32),
                 "segment_ids": jnp.ones((B, T), jnp.int32),
                 "positions": jnp.tile(jnp.arange(T, dtype=jnp.int32), (B, 1)),
                 "loss_mask": jnp.asarray(rng.random((B, T)) > 0.3, jnp.int32)}
    step = jax.jit(make_train_step(model, opt, args.grad_accum), donate_argnums=0)
    frozen_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state.frozen))
    if args.compile_only:
        t0 = time.perf_counter()
        ma = step.lower(state, batch).compile().memory_analysis()
        out = {"device": jax.devices()[0].device_kind, "compile_only": True, "quantize": args.quantize,
               "layers": args.layers, "hidden": args.hidden, "batch": B, "seq": T, "rank": args.rank,
               "remat": args.remat, "base_params": n_base, "adapter_params": lora.num_params(adapters),
               "frozen_base_gib": frozen_bytes / 2**30, "step_args_gib": ma.argument_size_in_bytes / 2**30,
               "step_temp_gib": ma.temp_size_in_bytes / 2**30, "step_output_gib": ma.output_size_in_bytes / 2**30,
               "compile_s": time.perf_counter() - t0}
        print(json.dumps(out))
        return out
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batch)
        losses.append(float(m["loss"]))
        times.append(time.perf_counter() - t0)
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    med = float(np.median(times))
    tokens = B * T
    out = {
        "device": dev.device_kind, "layers": args.layers, "hidden": args.hidden, "batch": B, "seq": T,
        "rank": args.rank, "remat": args.remat, "quantize": args.quantize, "frozen_base_gib": frozen_bytes / 2**30,
        "base_params": n_base, "adapter_params": lora.num_params(adapters),
        "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "bytes_limit_gib": stats.get("bytes_limit", 0) / 2**30,
        "step_temp_gib": getattr(ma, "temp_size_in_bytes", 0) / 2**30,
        # peak_gib counts the setup too (with --quantize nf4 the bf16 base and its NF4 copy coexist while
        # quantizing); arguments + temp is what the training steps themselves hold
        "step_args_plus_temp_gib": (getattr(ma, "argument_size_in_bytes", 0) + getattr(ma, "temp_size_in_bytes", 0))
        / 2**30,
        "step_args_gib": getattr(ma, "argument_size_in_bytes", 0) / 2**30,
        "compile_s": compile_s, "step_s_median": med, "tokens_per_s": tokens / med,
        "mfu": 4 * n_base * tokens / med / (args.peak_tflops * 1e12), "losses": losses,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
