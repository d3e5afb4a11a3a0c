#!/usr/bin/env bash
# Every GPU figure of issue 19 in ONE run of at most ~10 minutes wall (the device tool's per-command limit),
# each step under its own `timeout` and skipped when the run's remaining budget cannot hold it:
#   1. SFT step, ~1B Llama (16 layers, hidden 2048, 16 heads, vocab 32000, seq 2048, batch 8, bf16 compute):
#      ours vs torch eager (SDPA, bf16 autocast, fused AdamW) vs torch.compile, interleaved, MFU.
#   2. decode + prefill, same ~1B model in bf16, batch 16 and 64, prompt 128, 128 new tokens: ours vs HF
#      generate with the static KV cache, eager and torch.compile'd (mode "default"), prefill vs one HF forward;
#      the HBM-bound accounting (bytes per decode step / bandwidth) for every implementation; then a profile of
#      ours (--profile-dir): per decode step, kernels, busy/idle device time, device-to-host copies (host syncs),
#      the costliest kernels; the traces come back gzipped in OUTDIR (decode_b*_n*.xplane.pb.gz, 4 files).
#   3. bench_generate_stage.py (the generate stage vs bare decode); bench_engine.py (the continuous-batching
#      engine vs static generate, ~1B bf16, 16 slots, uniform and mixed answer lengths).
#   4. bench_eval.py on CUDA (ours vs lm-eval's `hf` model on cuda), hidden 512.
#   5. bench_serve.py at concurrency 1/8/32/64 with the 512-wide model.
# The device machine has jax[cuda], torch, transformers, flax, optax but no network: the server's, client's and
# lm-eval's packages come from wheels/ (bash benchmarks/fetch_gpu_wheels.sh, here, first; the device tool
# must carry "wheels"). Usage, in the repo root on the GPU machine:
#     bash benchmarks/gpu_figures.sh [OUTDIR]          (BUDGET=seconds overrides the 570 s total)
# H200: --hbm-gbps 4800 and --peak-tflops 989 (dense bf16, as H100 SXM); set HBM_GBPS / PEAK_TFLOPS otherwise.
#
# SMOKE=1 runs the same steps with the same flags on the CPU at toy sizes (every torch reference variant
# included: the static-cache and torch.compile'd HF generate run on the CPU when named), so a flag or code path
# that would fail on the GPU fails here first; tests/test_gpu_figures_smoke.py (slow) runs it. The exit status
# is non-zero when any step failed (or was cut by its timeout); the failed steps are listed at the end.
set -u
OUT=${1:-${OUT:-/tmp/gpu_figures}}; mkdir -p "$OUT"
SMOKE=${SMOKE:-0}
BUDGET=${BUDGET:-570}
END=$((SECONDS + BUDGET))
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# torch shares the card with jax in the same process: no 75% preallocation by XLA.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
HBM=${HBM_GBPS:-4800}; PEAK=${PEAK_TFLOPS:-989}
if [ "$SMOKE" = 1 ]; then  # toy sizes on the CPU: the flags and code paths, no figure
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
  TSCALE=3  # a busy 2-core CI runner: step timeouts x3 (the budget, BUDGET=, still caps the run)
  ONEB="--layers 2 --hidden 64 --heads 4 --kv-heads 4 --vocab 512"; R=5
  SFT_SHAPE="--seq 64 --batch 2"; DECODE_BATCHES="2 4"; DECODE_SHAPE="--prompt 8 --new 8"
  STAGE_SHAPE="--layers 2 --hidden 64 --vocab 512 --batch 2 --new 8"; ENGINE_SHAPE="--batch 2 --prompt 8 --new 16"
  EVAL_SHAPE="--hidden 64 --layers 2 --arc 8 --hellaswag 4"
  SERVE_SHAPE="--hidden 64 --layers 2 --max-tokens 8 --levels 1,4 --requests 8"
else
  export JAX_PLATFORMS=cuda
  TSCALE=1
  ONEB="--layers 16 --hidden 2048 --heads 16 --kv-heads 16 --vocab 32000"; R=5
  SFT_SHAPE="--seq 2048 --batch 8"; DECODE_BATCHES="16 64"; DECODE_SHAPE="--prompt 128 --new 128"
  STAGE_SHAPE=""; ENGINE_SHAPE="--batch 16 --prompt 128 --new 128"
  EVAL_SHAPE="--hidden 512 --layers 4"
  SERVE_SHAPE="--hidden 512 --layers 4 --max-tokens 64 --levels 1,8,32,64 --requests 64"
fi
FAILED="$OUT/failed_steps"; : > "$FAILED"

step() {  # step NAME SECONDS command...: run under timeout, never past the run's budget
  local name=$1 want=$(($2 * TSCALE)); shift 2
  local left=$((END - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "=== $name: SKIPPED (budget spent, ${left}s left)"; echo "$name (skipped: budget spent)" >> "$FAILED"; return
  fi
  local t=$(( want < left ? want : left ))
  echo "=== $name (timeout ${t}s, $(date -u +%H:%M:%S) UTC, load $(cut -d' ' -f1-3 /proc/loadavg))"
  local t0=$SECONDS
  timeout "$t" "$@" 2>&1 | grep -v -E "^WARNING|Warning:|it/s\]|^\s*$" | tail -"${TAIL:-14}"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0))s"
  [ "$rc" = 0 ] || echo "$name (rc=$rc)" >> "$FAILED"
}

{
date -u; nproc; head -1 /proc/stat
[ "$SMOKE" = 1 ] && echo "SMOKE=1: toy sizes on the CPU; no figure below is a measurement"
command -v nvidia-smi >/dev/null && \
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
python3 -c "import sys, jax, flax, optax, torch, transformers; print('python', sys.version.split()[0], 'jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, jax.devices())"
if [ -d wheels ]; then
  step "install wheels" 60 bash -c "python3 -m pip install -q --no-index --find-links wheels \
    fastapi==0.165.0 uvicorn==0.55.0 openai==3.60.0 httpx==0.29.0 dill jinja2 psutil more_itertools && \
    python3 -m pip install -q --no-index --no-deps --find-links wheels lm-eval==0.4.13 accelerate==1.16.0 && echo installed"
else
  echo "no wheels/ directory: bench_serve and bench_eval need it (bash benchmarks/fetch_gpu_wheels.sh)"
fi

TAIL=16 step "SFT ~1B: ours vs torch eager vs torch.compile" 160 python3 benchmarks/bench_sft.py $ONEB $SFT_SHAPE \
  --dtype bfloat16 --rounds "$R" --torch-compile --torch-compile-mode default --peak-tflops "$PEAK"
for B in $DECODE_BATCHES; do
  TAIL=30 step "decode + prefill ~1B bf16, batch $B: ours vs HF static cache eager / compiled" 110 \
    python3 benchmarks/bench_generate.py $ONEB --batch "$B" $DECODE_SHAPE --dtype bfloat16 --rounds "$R" \
    --torch-variants static,static-compiled --torch-compile-mode default --hbm-gbps "$HBM" --profile-dir "$OUT"
done
step "generate stage vs bare decode" 35 python3 benchmarks/bench_generate_stage.py $STAGE_SHAPE --rounds "$R"
step "continuous-batching engine vs static generate, ~1B bf16" 60 python3 benchmarks/bench_engine.py $ONEB \
  $ENGINE_SHAPE --dtype bfloat16 --rounds 3
if python3 -c "import lm_eval.models.huggingface" 2>/dev/null; then
  step "eval scorer on CUDA: ours vs lm-eval hf (cuda), hidden 512" 40 python3 benchmarks/bench_eval.py \
    $EVAL_SHAPE --rounds "$R"
else
  echo "=== eval: SKIPPED (lm_eval.models.huggingface does not import: wheels missing?)"
  echo "eval (lm_eval.models.huggingface does not import)" >> "$FAILED"
fi
step "server c=1/8/32/64, hidden 512" 110 python3 benchmarks/bench_serve.py --rounds "$((R < 3 ? R : 3))" \
  $SERVE_SHAPE --dtype bfloat16
echo "total ${SECONDS}s of ${BUDGET}s budget; $(date -u)"; head -1 /proc/stat
if [ -s "$FAILED" ]; then echo "FAILED steps:"; cat "$FAILED"; else echo "every step ran (rc=0)"; fi
} 2>&1 | tee "$OUT/gpu_figures.log"
[ ! -s "$FAILED" ]
