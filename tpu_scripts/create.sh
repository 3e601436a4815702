#!/usr/bin/env bash
# Create a TPU VM or pod slice: TPU_TYPE=v4-32 bash tpu_scripts/create.sh [--spot]
set -euo pipefail
source "$(dirname "$0")/common.sh"
gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$TPU_ZONE" --project "$TPU_PROJECT" \
  --accelerator-type "$TPU_TYPE" --version "$TPU_RUNTIME" "$@"
