#!/usr/bin/env bash
# Run a stage on every host of a TPU pod slice. Each host runs the same command; jax.distributed
# initializes from the TPU metadata (distributed: auto) and each process reads its shard of the data.
# Usage: TPU_NAME=my-v5e-64 ZONE=us-central2-b launch/tpu_pod.sh --config configs/sft_paper_llama7b.yaml --stages sft
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO=${REPO:-~/teams-rl-jax}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd $REPO && . .venv/bin/activate && python -m teams_rl_jax.train $*"
