#!/usr/bin/env bash
# Delete the TPU VM / slice (asks for confirmation unless --quiet is given).
set -euo pipefail
source "$(dirname "$0")/common.sh"
gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$TPU_ZONE" --project "$TPU_PROJECT" "$@"
