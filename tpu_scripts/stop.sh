#!/usr/bin/env bash
# Stop the training processes on every worker (SIGTERM first).
set -euo pipefail
source "$(dirname "$0")/common.sh"
tpu_ssh "pkill -TERM -f effjax.main || true"
