#!/usr/bin/env bash
# Start the same training command on every worker of the slice at once:
#   launch.sh --name=NAME --zone=ZONE [--dry-run] CONFIG WORKDIR [--config.x=y ...]
# runs `python3 -m effjax.main --config=CONFIG --workdir=WORKDIR
# --config.distributed.initialize=True --config.x=y ...` in the background on each worker, which
# is all jax.distributed.initialize() needs on Cloud TPU: it finds the coordinator (worker 0), the
# process count and each process id itself. WORKDIR must be a directory every worker sees (a
# gs:// bucket or an NFS/gcsfuse mount); CONFIG is relative to the code on the workers.
# Each worker keeps the run's pid in ~/effjax.pid and appends its output to ~/effjax.log; a worker
# whose previous run is still alive refuses to start another (stop.sh first).
set -euo pipefail
USAGE="usage: $(basename "$0") --name=NAME --zone=ZONE [--dry-run] CONFIG WORKDIR [--config.x=y ...]"
VALUE_OPTS=(--config --workdir)
FLAG_OPTS=()
source "$(dirname "$0")/common.sh"
parse_args "$@"
tpu_settings
parse_run_target "shared by all workers"

cmd=$(quote python3 -m effjax.main --config="$config" --workdir="$workdir" \
  --config.distributed.initialize=True ${rest[@]+"${rest[@]}"})
tpu_ssh all "cd $REPO_DIR || exit 1; $REMOTE_READ_PID; if $REMOTE_ALIVE; then \
echo \"\$(hostname): effjax is still running (pid \$p); run stop.sh first\" >&2; exit 1; fi; \
echo \"=== \$(date -u +%FT%TZ) launch\" >> $REMOTE_LOG; \
nohup $cmd >> $REMOTE_LOG 2>&1 < /dev/null & echo \$! > $REMOTE_PID; \
echo \"\$(hostname): started pid \$!, log $REMOTE_LOG\""
