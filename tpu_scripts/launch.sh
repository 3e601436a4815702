#!/usr/bin/env bash
# Start training on every worker (jax.distributed finds its peers on Cloud TPU by itself):
#   bash tpu_scripts/launch.sh configs/default.py /mnt/shared/runs/exp1 [--config.x=y ...]
# (the workdir must be shared by all workers: NFS or a gcsfuse-mounted bucket)
# The run continues in the background (nohup); logs go to ~/effjax.log on each worker.
set -euo pipefail
source "$(dirname "$0")/common.sh"
config="$1"; workdir="$2"; shift 2
tpu_ssh "cd $REPO_DIR && nohup python3 -m effjax.main --config=$config --workdir=$workdir \
  --config.distributed.initialize=True $* > ~/effjax.log 2>&1 &"
