#!/usr/bin/env bash
# Follow worker 0's log (Ctrl-C stops watching, not training).
set -euo pipefail
source "$(dirname "$0")/common.sh"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$TPU_ZONE" --project "$TPU_PROJECT" \
  --worker=0 --command "tail -n 50 -f ~/effjax.log"
