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
# Every case is also traced (3 calls): the rows name the kernels a call's device time goes to.
gmm_kernels() { python3 -m effjax.bench kernels --op=gmm --out="$RES" $CACHE \
                --profile_dir="$RES/gmm_profile"; }
# effjax's Triton tilings side by side at an 8- and a 64-expert shape.
gmm_tune() { python3 -m effjax.bench kernels --op=gmm --grid=tune --out="$RES" $CACHE \
             --profile_dir="$RES/gmm_tune_profile"; }
# The 8-expert top-2 training step vs the dense model of equal active parameters.
moe_step() { $TRAIN --name=moe_vs_dense --sweep=model.pattern=attention:mlp,attention:moe; }
# The MoE step traced: device time per op (the expert kernels, routing, sorting, attention) in
# $RES/moe_step_profile/summary.txt.
moe_step_profile() { $TRAIN --name=moe_step_profiled --profile_dir="$RES/moe_step_profile"; }
# The same MoE step with XLA's ragged_dot instead of the Pallas kernel.
moe_step_ragged() { $TRAIN --name=moe_ragged_dot --config.model.moe_gmm_backend=ragged_dot; }
# Two GPUs (nvidia-h200-x2): experts split over the 'expert' axis vs data parallel (same global
# batch), then one GPU at half the batch for the scaling ratio, then the expert-parallel step
# profiled (device time per op, the all_to_all included, in $RES/ep2_profile/summary.txt).
moe_ep2() { $TRAIN --name=moe_ep2 --config.train.batch_size=32 --sweep=mesh.expert=1,2;
            CUDA_VISIBLE_DEVICES=0 $TRAIN --name=moe_ep2_one_gpu --config.train.batch_size=16; }
moe_ep2_profile() { $TRAIN --name=moe_ep2_profiled --config.train.batch_size=32 \
                    --config.mesh.expert=2 --profile_dir="$RES/ep2_profile"; }

# The same two-device sweep at toy sizes on two forced CPU devices: checks the script's path, no
# performance meaning (experiments/moe/results/cpu_ep2_dry).
moe_ep2_dry() { XLA_FLAGS=--xla_force_host_platform_device_count=2 python3 -m effjax.bench train \
  --out="$RES" --config=configs/moe_gpu.py --name=moe_ep2_dry --config.model.d_model=128 \
  --config.model.num_layers=2 --config.model.num_heads=2 --config.model.num_kv_heads=2 \
  --config.model.mlp_dim=256 --config.model.moe_expert_mlp_dim=128 --config.model.vocab_size=512 \
  --config.data.seq_len=128 --config.train.batch_size=8 --config.train.loss_chunk_size=0 \
  --config.model.compute_dtype=float32 --config.model.output_dtype=float32 \
  --sweep=mesh.expert=1,2 --steps=2 --repeats=1 --warmup_steps=1; }

steps=("$@")
if [ "${steps[0]:-all}" = all ]; then steps=(gmm_kernels moe_step moe_step_ragged); fi
for step in "${steps[@]}"; do
  echo "=== $step"
  "$step" 2>&1 | tail -40
  tar czf "$OUT/results.tgz" -C "$RES" --exclude='*.xplane.pb' .
done
