#!/usr/bin/env bash
# Run the TeaMs-RL pipeline on every host of a TPU pod slice: each host runs the same command;
# jax.distributed initializes from the TPU metadata (distributed: auto) and each process takes its
# shard of the seeds (generate) and of every batch (sft).
# Expects: launch/tpu_setup.sh done (repo at $REPO with its .venv on every host); the checkpoint and
# run_dir paths of $CONFIG visible from every host (shared storage).
#   TPU_NAME=my-v5p-32 ZONE=us-east5-a launch/tpu_pod.sh                      # configs/llama2_7b_tpu_pod.yaml
#   TPU_NAME=... ZONE=... CONFIG=configs/sft_paper_llama7b.yaml launch/tpu_pod.sh --set sft.data.path=/mnt/alpaca.json
# Extra arguments go to `python -m teams_rl_jax.train`, each quoted for the remote shell (a value with
# spaces stays one argument).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO=${REPO:-~/teams-rl-jax}
CONFIG=${CONFIG:-configs/llama2_7b_tpu_pod.yaml}
ARGS=$(printf ' %q' --config "$CONFIG" "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd $(printf %q "$REPO") && . .venv/bin/activate && python -m teams_rl_jax.train$ARGS"
