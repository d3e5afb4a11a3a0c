#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md (the device machine's own python3 has jax[cuda], flax, optax,
# transformers). Part 1: cuDNN attention check, ~1B SFT step with auto (cuDNN) attention (MFU), ~1B decode
# (HBM bound), loss memory. Part 2: the same SFT step with XLA attention,
# unrolled layers, remat dots_saveable; decode with unrolled layers. Part 3: Llama-2-7B-shaped LoRA step,
# bf16 base vs QLoRA's NF4 base (peak memory, tokens/s).
# Usage (on the GPU machine, repo root): bash benchmarks/gpu_figures.sh 1|2|3 [OUTDIR]
set -u
PART=${1:-1}; OUT=${2:-${OUT:-/tmp/gpu_figures}}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda TOKENIZERS_PARALLELISM=false
ONEB="--layers 16 --hidden 2048 --heads 16 --kv-heads 16 --vocab 32000"
SFT="python3 benchmarks/bench_sft.py $ONEB --seq 2048 --batch 8 --dtype bfloat16 --no-torch --peak-tflops 989 --rounds 5"
{
if [ "$PART" = 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  # -o addopts=: setup.cfg's "-n 2" needs pytest-xdist, which the device machine may lack
  timeout 100 python3 -m pytest -q -o addopts= -p no:cacheprovider tests/test_attention.py -k "cudnn or resolve" 2>&1 | tail -15
  timeout 200 $SFT --attention auto 2>&1 | grep -v "^WARNING" | tail -9
  timeout 150 python3 benchmarks/bench_generate.py $ONEB --batch 16 --prompt 128 --new 128 --dtype bfloat16 \
    --no-torch --rounds 5 2>&1 | tail -6
  timeout 60 python3 benchmarks/bench_sft.py --ce-memory 2>&1 | tail -4
elif [ "$PART" = 3 ]; then
  timeout 240 python3 benchmarks/bench_lora_7b.py --batch 8 --seq 512 --remat full 2>&1 | tail -1
  timeout 240 python3 benchmarks/bench_lora_7b.py --batch 8 --seq 512 --remat full --quantize nf4 2>&1 | tail -1
else
  timeout 150 $SFT --attention xla 2>&1 | grep -v "^WARNING" | tail -9
  timeout 150 $SFT --attention auto --unroll 16 2>&1 | grep -v "^WARNING" | tail -9
  timeout 150 $SFT --attention auto --remat dots_saveable 2>&1 | grep -v "^WARNING" | tail -9
  timeout 150 python3 benchmarks/bench_generate.py $ONEB --batch 16 --prompt 128 --new 128 --dtype bfloat16 \
    --no-torch --rounds 5 --unroll 16 2>&1 | tail -6
fi
} 2>&1 | tee "$OUT/gpu_figures_$PART.log"
