#!/bin/bash
# The Hopper attention study on the GPU machine, in named steps, most important first; every
# result file is packed into $OUT/results.tgz after each step (a run cut short keeps what it did).
#   bash experiments/attention_kernels/run_gpu.sh STEP [STEP ...]
#   steps: check d256 model auto quick targets gpt2 gpt2_alternating gpt1b fwd_sweep fwd_variants
#          grid
set -u
OUT=${OUT:-/tmp/effjax_attention_out}
RES=${RES:-/tmp/effjax_attention_results}
mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1
CACHE=--compilation_cache_dir=/tmp/effjax_xla_cache

# Both GPU backends against the float32 reference: the fixed cases and 6 random ones each.
check() {
  for backend in mosaic_gpu triton; do
    python3 experiments/attention_kernels/gpu_check.py --quick --backend=$backend --random=6 \
      2>&1 | tee "$RES/gpu_check_$backend.txt"
  done
}
# fwd+bwd at D256: the Triton backward (default), the head-dim-split Mosaic GPU one, cuDNN.
d256() {
  python3 experiments/attention_kernels/gpu_check.py --quick --d256 --backend=mosaic_gpu \
    2>&1 | tee "$RES/gpu_check_d256.txt"
}
# The model path: the three flash-op layers on the Mosaic GPU backend through the real command
# (train, evaluate, checkpoint, sample), a few steps.
model() {
  python3 -m effjax.main --config=configs/attention_kinds.py --workdir=/tmp/effjax_kinds_mgpu \
    --config.model.attention_backend=mosaic_gpu --config.model.compute_dtype=bfloat16 \
    --config.model.block_sparse_block=128 --config.model.block_sparse_local_blocks=1 \
    --config.data.seq_len=512 --config.train.steps=6 --config.optim.warmup_steps=2 \
    --config.train.eval_every=3 \
    --config.train.checkpoint_every=3 2>&1 | tail -40 | tee "$RES/model_mosaic_gpu.txt"
}
# backend 'auto' on Hopper in bf16: configs/attention_kinds.py's flash and window layers take
# Mosaic GPU, its 32-token BigBird layer Triton (the per-layer fallback), through the real command.
auto() {
  python3 -m effjax.main --config=configs/attention_kinds.py --workdir=/tmp/effjax_kinds_auto \
    --config.model.compute_dtype=bfloat16 --config.data.seq_len=512 --config.train.steps=6 \
    --config.optim.warmup_steps=2 --config.train.eval_every=3 \
    --config.train.checkpoint_every=3 2>&1 | tail -40 | tee "$RES/model_auto.txt"
}
# Two causal D-128 shapes, window and BigBird at 16k, every peer: minutes, after a kernel change.
quick() {
  python3 -m effjax.bench kernels --op=attention --grid=quick --repeats=10 $CACHE \
    --impls=effjax_triton,effjax_mosaic_gpu,tokamax,cudnn --out="$RES" --name=attention_quick
}
# The targets' shapes (causal, S 1k-32k, D 64/128, window and BigBird at 16k), every peer.
targets() {
  python3 -m effjax.bench kernels --op=attention --grid=targets --repeats=10 $CACHE \
    --impls=effjax_triton,effjax_mosaic_gpu,tokamax,cudnn --out="$RES" --name=attention_targets
}
# GPT-2-small and the 1B model training with flash layers on each backend against cuDNN.
train_pair() {  # $1 config, $2 name: cuDNN attention layers, then flash layers on each backend
  python3 -m effjax.bench train --config=configs/$1.py --out="$RES" $CACHE --name=${2}_cudnn
  python3 -m effjax.bench train --config=configs/$1.py --out="$RES" $CACHE --name=${2}_flash \
    --config.model.pattern=flash:mlp --sweep=model.attention_backend=triton,mosaic_gpu
}
gpt2() { train_pair gpt2_small gpt2; }
# The same comparison in one process, windows in alternation (bench train --alternate): cuDNN
# attention layers, flash layers on Mosaic GPU, flash layers on Triton; the ratio to cuDNN is the
# median of per-round ratios, so clock drift between calls does not decide a 2% difference.
gpt2_alternating() {
  python3 -m effjax.bench train --config=configs/gpt2_small.py --out="$RES" $CACHE \
    --name=gpt2_alternating --repeats=8 --steps=6 --warmup_steps=2 \
    --alternate=model.pattern=attention:mlp,flash:mlp,flash:mlp \
    --alternate=model.attention_backend=auto,mosaic_gpu,triton
}
gpt1b() { train_pair gpt_1b gpt1b; }
# The Mosaic GPU forward's key tile and ring depth against cuDNN (D64 and D128, S 4k and 16k).
fwd_sweep() {
  python3 experiments/attention_kernels/fwd_sweep.py --out="$RES/fwd_sweep.txt"
}
# The forward's main-loop variants (mosaic_gpu.FWD_VARIANTS): the ones not yet run on a GPU
# against the float32 reference on the masks (GQA, full, window, segments, BigBird), then each
# alone and two combinations at the default tiling beside the committed forward, cuDNN and
# tokamax, timed in alternation (D128 at S 4k and 16k, then D64 at 4k; fwd_sweep.py --variants).
fwd_variants() {
  python3 experiments/attention_kernels/fwd_sweep.py --variants --shapes=${FVAR_SHAPES:-2,3,0} \
    --out="$RES/fwd_variants.txt"
}
# The full default grid (causal and full, S 1k-32k).
grid() {
  python3 -m effjax.bench kernels --op=attention --repeats=10 $CACHE \
    --impls=effjax_triton,effjax_mosaic_gpu,tokamax,cudnn --out="$RES" --name=attention_grid
}

rc=0
for step in "$@"; do
  echo "=== $step"
  $step || rc=1
  tar czf "$OUT/results.tgz" -C "$RES" .
done
exit $rc
