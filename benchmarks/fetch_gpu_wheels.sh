#!/usr/bin/env bash
# Download (here, with network) the wheels benchmarks/gpu_figures.sh installs on the device machine, which
# has jax[cuda], torch, transformers, flax and optax but no network and none of the packages below.
# Output: wheels/ (git-ignored) in the repo root; the device tool carries it when named in `carry`
# (64 MiB in all: see the size printed at the end).
#
# Usage: bash benchmarks/fetch_gpu_wheels.sh [PYVER ...]     (default: 3.12 3.11; the GPU machine's python)
#   WHEELS=serve  bash benchmarks/fetch_gpu_wheels.sh     only the server's and client's packages (small)
#
# * serve set (bench_serve.py): fastapi, uvicorn, openai, httpx and their dependencies.
# * eval set (bench_eval.py's reference, lm-eval 0.4.13's `hf` model): lm-eval and accelerate without their
#   dependencies, plus what `import lm_eval.models.huggingface` loads (checked here: accelerate, dill,
#   jinja2; psutil for accelerate; more_itertools). lm-eval's full dependency set (datasets -> pyarrow
#   ~42 MiB and pandas, scikit-learn -> scipy ~35 MiB, per Python version) is well over the 64 MiB that
#   the device tool carries and is not needed to score requests; gpu_figures.sh installs lm-eval with
#   --no-deps and skips the eval figure with a message if lm_eval.models.huggingface does not import.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/wheels}
PIP=${PIP:-python3 -m pip}
VERSIONS=${*:-3.12 3.11}
SET=${WHEELS:-all}
mkdir -p "$OUT"
PLAT="--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any"
# pinned to the versions the tests pass with on the development VM
SERVE="fastapi==0.165.0 uvicorn==0.55.0 openai==3.60.0 httpx==0.29.0"
EVAL_NODEPS="lm-eval==0.4.13 accelerate==1.16.0"
EVAL_LIGHT="dill jinja2 psutil more_itertools"

for V in $VERSIONS; do
  $PIP download --only-binary=:all: --python-version "$V" $PLAT --find-links "$OUT" -d "$OUT" $SERVE
  if [ "$SET" != serve ]; then
    $PIP download --only-binary=:all: --python-version "$V" $PLAT --no-deps -d "$OUT" $EVAL_NODEPS
    $PIP download --only-binary=:all: --python-version "$V" $PLAT --find-links "$OUT" -d "$OUT" $EVAL_LIGHT
  fi
done
# numpy (~16 MiB per Python version, if a dependency pulls it in) is on the device machine already (jax and
# torch need it); setuptools likewise.
rm -f "$OUT"/numpy-*.whl "$OUT"/setuptools-*.whl
du -sh "$OUT"
ls -S "$OUT" | head -5
