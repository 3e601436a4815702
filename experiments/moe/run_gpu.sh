#!/bin/bash
# The MoE benchmarks on the GPU machine, most important first; every result file is packed into
# $OUT/results.tgz after each step, so a run cut short still returns what it finished.
#   bash experiments/moe/run_gpu.sh STEP [STEP ...]        (steps: the functions below, or all)
set -u
OUT=${OUT:-/tmp/effjax_moe_out}
RES=${RES:-/tmp/effjax_moe_results}
mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1
CACHE=--compilation_cache_dir=/tmp/effjax_xla_cache
TRAIN="python3 -m effjax.bench train --out=$RES $CACHE --config=configs/moe_gpu.py"

# Grouped matmul (effjax, tokamax where installed) vs jax.lax.ragged_dot vs the dense batched
# einsum of the same FLOPs; each kernel row is checked against float32 ragged_dot before timing.
gmm_kernels() { python3 -m effjax.bench kernels --op=gmm --out="$RES" $CACHE; }
# effjax's Triton tilings side by side at an 8- and a 64-expert shape.
gmm_tune() { python3 -m effjax.bench kernels --op=gmm --grid=tune --out="$RES" $CACHE; }
# The 8-expert top-2 training step vs the dense model of equal active parameters.
moe_step() { $TRAIN --name=moe_vs_dense --sweep=model.pattern=attention:mlp,attention:moe; }
# The same MoE step with XLA's ragged_dot instead of the Pallas kernel.
moe_step_ragged() { $TRAIN --name=moe_ragged_dot --config.model.moe_gmm_backend=ragged_dot; }
# Two GPUs (nvidia-h200-x2): experts split over the 'expert' axis vs data parallel.
moe_ep2() { $TRAIN --name=moe_ep2 --config.train.batch_size=32 \
            --sweep=mesh.expert=1,2; }

steps=("$@")
if [ "${steps[0]:-all}" = all ]; then steps=(gmm_kernels moe_step moe_step_ragged); fi
for step in "${steps[@]}"; do
  echo "=== $step"
  "$step" 2>&1 | tail -40
  tar czf "$OUT/results.tgz" -C "$RES" .
done
