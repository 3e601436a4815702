#!/usr/bin/env bash
# Stop the run on every worker: SIGTERM, which effjax answers by finishing the step in flight,
# writing a checkpoint and exiting 0 (the same as a preemption), then wait until it has exited:
#   stop.sh --name=NAME --zone=ZONE [--no-wait] [--kill] [--dry-run]
# --kill sends SIGKILL instead (no checkpoint); --no-wait returns once the signal is sent.
set -euo pipefail
USAGE="usage: $(basename "$0") --name=NAME --zone=ZONE [--no-wait] [--kill] [--dry-run]"
VALUE_OPTS=()
FLAG_OPTS=(--no-wait --kill)
source "$(dirname "$0")/common.sh"
parse_args "$@"
tpu_settings
((${#ARGS[@]} == 0)) || die "unexpected argument '${ARGS[0]}' (stop.sh takes options only)"
signal=TERM
[[ -n ${OPT[--kill]:-} ]] && signal=KILL
wait_for_exit=''
[[ -z ${OPT[--no-wait]:-} ]] &&
  wait_for_exit="while $REMOTE_ALIVE; do sleep 1; done; echo \"\$(hostname): stopped\"; "
tpu_ssh all "$REMOTE_READ_PID; if $REMOTE_ALIVE; then kill -$signal \$p; \
echo \"\$(hostname): sent SIG$signal to pid \$p\"; ${wait_for_exit}else \
echo \"\$(hostname): effjax is not running\"; fi"
