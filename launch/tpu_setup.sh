#!/usr/bin/env bash
# One-time set-up on every host of a TPU pod slice (copy the repo to $REPO first).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO=${REPO:-~/teams-rl-jax}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd $REPO && python3 -m venv .venv && . .venv/bin/activate && pip install -e . 'jax[tpu]'"
