#!/bin/bash
# Every config in configs/ trains a few steps, evaluates, checkpoints, resumes and samples through
# `python -m effjax.main` on this machine (experiments/gpu_smoke/smoke.py); multi-device configs
# are skipped with the reason. Run it after every change that touches a model, a kernel or the
# train step. The table is printed last; results and every log are packed into $OUT/smoke.tgz.
#   bash experiments/gpu_smoke/run_gpu.sh [--steps=4] [--jobs=1] [--only=moe,moe_gpu]
set -u
OUT=${OUT:-/tmp/effjax_smoke_out}
RES=${RES:-/tmp/effjax_smoke}
mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1
python3 experiments/gpu_smoke/smoke.py --out="$RES" "$@"
rc=$?
cp "$RES/smoke.json" "$RES/smoke.md" "$OUT/" 2>/dev/null
tar czf "$OUT/smoke.tgz" -C "$RES" --exclude=runs --exclude=xla_cache .
exit $rc
