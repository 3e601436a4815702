#!/usr/bin/env bash
# Delete the TPU VM / slice, or with --queued the queued resource and its node:
#   delete.sh --name=NAME --zone=ZONE [--queued] [--yes] [--dry-run] [-- EXTRA_GCLOUD_FLAGS...]
# gcloud asks for confirmation unless --yes is given.
set -euo pipefail
USAGE="usage: $(basename "$0") --name=NAME --zone=ZONE [--queued] [--yes] [--dry-run] [-- GCLOUD_FLAGS...]"
VALUE_OPTS=()
FLAG_OPTS=(--yes)
source "$(dirname "$0")/common.sh"
parse_args "$@"
tpu_settings
extra=()
[[ -n ${OPT[--yes]:-} ]] && extra=(--quiet)
if [[ $TPU_QUEUED == 1 ]]; then
  # --force also deletes the node the queued resource provisioned.
  run gcloud compute tpus queued-resources delete "$TPU_NAME" "${LOCATION[@]}" --force \
    ${extra[@]+"${extra[@]}"} ${ARGS[@]+"${ARGS[@]}"}
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION[@]}" \
    ${extra[@]+"${extra[@]}"} ${ARGS[@]+"${ARGS[@]}"}
fi
