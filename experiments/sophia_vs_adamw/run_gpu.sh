#!/bin/bash
# The Sophia vs AdamW study: every run is configs/sophia_study.py plus optimizer overrides, in its
# own workdir under $RES; analyze.py then writes the table and the loss-curve plot.
#   bash experiments/sophia_vs_adamw/run_gpu.sh RUN [RUN ...]      (RUN: a name below, or 'all')
# A rerun of a finished run resumes from its last checkpoint and ends at once, so the script can
# be called again after a cut-short run to fill in what is missing.
# EXTRA="--config.x=v ..." is appended to every run (e.g. to shrink it for a smoke test).
# PARALLEL=N runs N trainings at once on the one GPU (each gets 1/N of its memory; Sophia-H
# needs ~26 GB on this model, as its Hessian-vector product goes through XLA's attention). Their logged
# step times are then meaningless; the study takes step times from the isolated benchmark
# (BENCH=1, run first, alone: `effjax.bench train` of the same config per optimizer).
set -u
OUT=${OUT:-/tmp/sophia_out}
RES=${RES:-/tmp/sophia_runs}
mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1 XLA_FLAGS=${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}
declare -A RUNS=(
  # AdamW learning-rate sweep (betas 0.9/0.95, cosine to 0, wd 0.1)
  [adamw_1.5e-4]="--config.optim.learning_rate=1.5e-4"
  [adamw_3e-4]="--config.optim.learning_rate=3e-4"
  [adamw_6e-4]="--config.optim.learning_rate=6e-4"
  [adamw_1.2e-3]="--config.optim.learning_rate=1.2e-3"
  # Sophia-G (the paper's betas 0.965/0.99, refresh every 10 steps on 8 of the 32 rows of the
  # step's batch): learning rate x rho. With the estimate scaled by its own token count (the
  # paper's B), rho=0.16 here equals rho=0.04 of code that scales by the step's token count.
  [sophia_g_7.5e-5_r0.04]="--config.optim.name=sophia_g --config.optim.learning_rate=7.5e-5 --config.optim.rho=0.04"
  [sophia_g_1.5e-4_r0.04]="--config.optim.name=sophia_g --config.optim.learning_rate=1.5e-4 --config.optim.rho=0.04"
  [sophia_g_3e-4_r0.04]="--config.optim.name=sophia_g --config.optim.learning_rate=3e-4 --config.optim.rho=0.04"
  [sophia_g_6e-4_r0.04]="--config.optim.name=sophia_g --config.optim.learning_rate=6e-4 --config.optim.rho=0.04"
  [sophia_g_3e-4_r0.16]="--config.optim.name=sophia_g --config.optim.learning_rate=3e-4 --config.optim.rho=0.16"
  [sophia_g_6e-4_r0.16]="--config.optim.name=sophia_g --config.optim.learning_rate=6e-4 --config.optim.rho=0.16"
  # Sophia-H (Hutchinson, Rademacher probes)
  [sophia_h_1.5e-4_r0.04]="--config.optim.name=sophia_h --config.optim.learning_rate=1.5e-4 --config.optim.rho=0.04"
)
SOPHIA_BETAS="--config.optim.b1=0.965 --config.optim.b2=0.99 --config.optim.hessian_interval=10"
SOPHIA_BETAS="$SOPHIA_BETAS --config.optim.hessian_rows=8"
PARALLEL=${PARALLEL:-1}

if [ "${BENCH:-0}" = 1 ]; then  # per-step cost of each optimizer, measured alone
  python3 -m effjax.bench train --config=configs/sophia_study.py --sweep=optim.name=adamw,sophia_g,sophia_h \
    --config.optim.hessian_rows=8 --config.optim.hessian_interval=10 --steps=20 --repeats=5 \
    --warmup_steps=5 --out="$OUT/bench" --name=sophia_overhead 2>&1 | tail -n 12
fi
if [ "$PARALLEL" -gt 1 ]; then
  export XLA_PYTHON_CLIENT_MEM_FRACTION=$(python3 -c "print(round(0.9 / $PARALLEL, 3))")
fi

names=("$@")
if [ "${names[0]:-}" = all ]; then names=("${!RUNS[@]}"); fi
for name in "${names[@]}"; do
  extra=${RUNS[$name]:?unknown run $name}
  [[ $name == sophia* ]] && extra="$extra $SOPHIA_BETAS"
  while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do wait -n; done
  echo "=== $name $(date -u +%T)"
  (python3 -m effjax.main --config=configs/sophia_study.py --workdir="$RES/$name" $extra ${EXTRA:-} \
    > "$RES/$name.log" 2>&1; echo "=== $name ended $(date -u +%T)"; tail -n 3 "$RES/$name.log") \
    | tee -a "$OUT/log.txt" &
done
wait
bench=$(ls "$OUT"/bench/sophia_overhead*.json 2>/dev/null | tail -n 1)
python3 experiments/sophia_vs_adamw/analyze.py "$RES" --out="$OUT" ${bench:+--bench="$bench"} \
  | tee "$OUT/summary.txt"
tar -czf "$OUT/runs.tgz" --exclude=checkpoints --exclude=tb -C "$RES" .
# the machine returns only a few files: one archive for the benchmark's
if [ -d "$OUT/bench" ]; then tar -czf "$OUT/bench.tgz" -C "$OUT" bench && rm -rf "$OUT/bench"; fi
