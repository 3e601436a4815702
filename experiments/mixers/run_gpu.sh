#!/bin/bash
# The recurrent-mixer benchmarks on one GPU, most important first; every result file is packed
# into $OUT/results.tgz after each step, so a run cut short still returns what it finished.
#   bash experiments/mixers/run_gpu.sh [STEP ...]        (steps: the functions below; default all)
# The fla peer needs flash-linear-attention (PyTorch, Triton) installed beside effjax.
set -u
OUT=${OUT:-/tmp/effjax_mixers_out}
RES=${RES:-/tmp/effjax_mixers_results}
mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1
CACHE=--compilation_cache_dir=/tmp/effjax_xla_cache

# GLA / SSD chunked-scan kernels vs the plain-JAX steps vs the reference vs cuDNN attention.
scan_kernels() { python3 -m effjax.bench kernels --op=scan --out="$RES" $CACHE; }
# flash-linear-attention's chunk kernel, forward, at the 'gla' shapes of scan_kernels.
fla_peer() { python3 -m effjax.bench.fla_peer --out="$RES/fla_peer.json"; }
# Decoding tokens/s against context length at the study's model size, bf16.
decode() {
  for cfg in "gla:mlp" "mamba2:none --config.model.num_layers=16" "attention:mlp"; do
    python3 -m effjax.bench decode --config=configs/mixers_study.py $CACHE --out="$RES" \
      --config.model.compute_dtype=bfloat16 --contexts=1024,4096,16384,32768 \
      --name="decode_${cfg%%:*}" --config.model.pattern=$cfg
  done
}

steps=("$@")
if [ ${#steps[@]} -eq 0 ]; then steps=(scan_kernels fla_peer decode); fi
for step in "${steps[@]}"; do
  echo "=== $step"
  "$step" 2>&1 | tail -40
  tar czf "$OUT/results.tgz" -C "$RES" .
done
