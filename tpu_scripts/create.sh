#!/usr/bin/env bash
# Create a TPU VM or pod slice, directly or through a queued resource, on demand or spot:
#   create.sh --name=NAME --zone=ZONE --type=v5litepod-16 [--runtime=R] [--spot|--preemptible]
#             [--queued [--no-wait]] [--dry-run] [-- EXTRA_GCLOUD_FLAGS...]
# A queued resource (--queued) waits in Google's queue until capacity is free; this script then
# polls it until its node is ACTIVE (every TPU_POLL_SECONDS, 30 by default), so that setup.sh can
# follow, unless --no-wait is given. The node gets the queued resource's name either way.
set -euo pipefail
USAGE="usage: $(basename "$0") --name=NAME --zone=ZONE --type=TYPE [--runtime=R] [--spot|--preemptible] [--queued [--no-wait]] [--dry-run] [-- GCLOUD_FLAGS...]"
VALUE_OPTS=()
FLAG_OPTS=(--no-wait)
source "$(dirname "$0")/common.sh"
parse_args "$@"
tpu_settings need-type
poll=${TPU_POLL_SECONDS:-30}
[[ $poll =~ ^[0-9]+$ ]] || die "TPU_POLL_SECONDS='$poll': must be a whole number of seconds"

capacity=()
[[ $TPU_SPOT == 1 ]] && capacity=(--spot)
[[ $TPU_PREEMPTIBLE == 1 ]] && capacity=(--preemptible)
kind=on-demand
((${#capacity[@]})) && kind=${capacity[0]#--}
note "$TPU_TYPE ($TPU_HOSTS host(s)), runtime $TPU_RUNTIME, $kind, zone $TPU_ZONE"

if [[ $TPU_QUEUED == 0 ]]; then
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${LOCATION[@]}" \
    --accelerator-type="$TPU_TYPE" --version="$TPU_RUNTIME" ${capacity[@]+"${capacity[@]}"} \
    ${ARGS[@]+"${ARGS[@]}"}
  exit 0
fi

run gcloud compute tpus queued-resources create "$TPU_NAME" "${LOCATION[@]}" \
  --node-id="$TPU_NAME" --accelerator-type="$TPU_TYPE" --runtime-version="$TPU_RUNTIME" \
  ${capacity[@]+"${capacity[@]}"} ${ARGS[@]+"${ARGS[@]}"}
[[ -n ${OPT[--no-wait]:-} ]] && exit 0
describe=(gcloud compute tpus queued-resources describe "$TPU_NAME" "${LOCATION[@]}"
          --format='value(state.state)')
if [[ $DRY_RUN == 1 ]]; then
  run "${describe[@]}"  # polled until ACTIVE
  exit 0
fi
last=''
while true; do
  state=$("${describe[@]}")
  [[ $state != "$last" ]] && note "queued resource $TPU_NAME: ${state:-(no state yet)}"
  last=$state
  case $state in
    ACTIVE) exit 0 ;;
    FAILED | SUSPENDED | SUSPENDING | DELETING)
      echo "$SCRIPT_NAME: queued resource $TPU_NAME is $state; see gcloud compute tpus queued-resources describe $TPU_NAME --zone=$TPU_ZONE, then delete.sh --queued" >&2
      exit 1 ;;
  esac
  sleep "$poll"
done
