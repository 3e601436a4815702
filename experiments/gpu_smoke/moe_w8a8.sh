#!/bin/bash
# On one GPU: the W8A8 routed experts, first the int8 grouped matmul against a float64 reference
# (moe_w8a8_check.py), then through the real commands: configs/moe.py trains a few steps,
# --mode=compress writes its W8A8 model (calibration, held-out loss before and after, decode
# tokens/s in report.md), and the compressed model evaluates, generates and fine-tunes two steps.
#   bash experiments/gpu_smoke/moe_w8a8.sh [steps]
set -u
STEPS=${1:-40}
RES=${RES:-/tmp/effjax_moe_w8a8}
rm -rf "$RES" && mkdir -p "$RES"
export PYTHONUNBUFFERED=1
C="--config=configs/moe.py --config.train.steps=$STEPS --config.train.checkpoint_every=$STEPS
   --config.train.eval_every=$STEPS --config.train.log_every=10 --config.optim.warmup_steps=1"
rc=0
step() {  # $1 name, then the command; its log goes to $RES/$1.log, its exit code is printed
  local name=$1; shift
  "$@" > "$RES/$name.log" 2>&1
  local code=$?
  echo "$name: exit $code"; tail -n 4 "$RES/$name.log" | sed 's/^/    /'
  [ $code -eq 0 ] || rc=1
}
step kernel_check python3 experiments/gpu_smoke/moe_w8a8_check.py
step train python3 -m effjax.main $C --workdir="$RES/src"
step compress python3 -m effjax.main $C --workdir="$RES/src" --mode=compress \
  --config.compress.method=w8a8 --config.compress.out_workdir="$RES/w8a8"
step eval python3 -m effjax.main $C --workdir="$RES/w8a8" --mode=eval
step generate python3 -m effjax.main $C --workdir="$RES/w8a8" --mode=generate \
  --config.generate.max_new_tokens=32
step finetune python3 -m effjax.main $C --workdir="$RES/w8a8" --config.train.steps=$((STEPS + 2))
[ -f "$RES/w8a8/report.md" ] && cat "$RES/w8a8/report.md"
if [ -n "${OUT:-}" ]; then
  cp "$RES"/w8a8/report.* "$OUT/" 2>/dev/null
  tar czf "$OUT/moe_w8a8_logs.tgz" -C "$RES" $(cd "$RES" && ls *.log)
fi
echo "moe_w8a8: $([ $rc -eq 0 ] && echo all steps passed || echo FAILED)"
exit $rc
