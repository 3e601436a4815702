#!/usr/bin/env bash
# Follow the run's log on one worker (Ctrl-C stops watching, not training):
#   watch.sh --name=NAME --zone=ZONE [--worker=0|1|...|all] [--lines=100] [--dry-run]
# Process 0 (worker 0) logs the metrics; --worker=all interleaves every worker's log.
set -euo pipefail
USAGE="usage: $(basename "$0") --name=NAME --zone=ZONE [--worker=N|all] [--lines=N] [--dry-run]"
VALUE_OPTS=(--worker --lines)
FLAG_OPTS=()
source "$(dirname "$0")/common.sh"
parse_args "$@"
tpu_settings
((${#ARGS[@]} == 0)) || die "unexpected argument '${ARGS[0]}' (watch.sh takes options only)"
worker=${OPT[--worker]:-0}
lines=${OPT[--lines]:-100}
[[ $worker == all || $worker =~ ^[0-9]+$ ]] || die "--worker='$worker': must be a worker number (0, 1, ...) or all"
[[ $lines =~ ^[0-9]+$ ]] || die "--lines='$lines': must be a number of lines"
tpu_ssh "$worker" "tail -n $lines -F $REMOTE_LOG"
