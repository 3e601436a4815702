#!/usr/bin/env bash
# Copy this checkout to every worker and install it with the TPU extra.
set -euo pipefail
source "$(dirname "$0")/common.sh"
root="$(cd "$(dirname "$0")/.." && pwd)"
tar -C "$root" --exclude=.git -czf /tmp/effjax-src.tgz .
gcloud compute tpus tpu-vm scp /tmp/effjax-src.tgz "$TPU_NAME":/tmp/ --zone "$TPU_ZONE" \
  --project "$TPU_PROJECT" --worker=all
tpu_ssh "mkdir -p $REPO_DIR && tar -C $REPO_DIR -xzf /tmp/effjax-src.tgz && \
  cd $REPO_DIR && python3 -m pip install -q -e '.[tpu]' && python3 -c 'import jax; print(jax.devices())'"
