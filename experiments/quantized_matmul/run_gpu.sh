#!/bin/bash
# The weight-only quantized matmul on one GPU, most important first; results go to $RES (and
# are packed into $OUT/results.tgz after each step, so a run cut short returns what it finished).
#   bash experiments/quantized_matmul/run_gpu.sh STEP [STEP ...]   (the functions below, or all)
#   'all' is check kernels_int8 kernels_int4 decode
set -u
OUT=${OUT:-/tmp/effjax_qmm_out}
RES=${RES:-/tmp/effjax_qmm_results}
mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1
CACHE=--compilation_cache_dir=/tmp/effjax_xla_cache

# The kernel against the float32 reference: int8 / int4, bf16 / f16 / f32, M 1-100, gpt_1b's
# shapes, odd shapes, explicit tilings, gradients, shard_map, 'auto' dispatch (a minute or two).
check() { python3 experiments/quantized_matmul/gpu_check.py | tee "$RES/gpu_check.txt"; }
# bf16 matmul vs the int8 (then int4) weights through XLA and through the kernel, gpt_1b's
# decode shapes and 4096 x 14336 at M = 1, 8, 16; every row checked against float32 before
# timing, and traced, so the rows also carry device time per product (profile_ms, traced GB/s).
# One kind per call (54 rows each) to stay within a 10-minute command.
kernels_int8() { python3 -m effjax.bench kernels --op=qmm --impls=bf16,xla_int8,effjax_int8 \
                 --out="$RES" --name=kernels_qmm_int8 $CACHE \
                 --profile_dir="$RES/qmm_int8_profile"; }
kernels_int4() { python3 -m effjax.bench kernels --op=qmm --impls=bf16,xla_int4,effjax_int4 \
                 --out="$RES" --name=kernels_qmm_int4 $CACHE \
                 --profile_dir="$RES/qmm_int4_profile"; }
# The kernel's tilings (bn, bk, split) side by side at M = 1, one kind per call (72 rows each:
# per shape the bf16 row, the default tiling and 16 others, a shape's invalid ones skipped).
tune_int8() { python3 -m effjax.bench kernels --op=qmm --grid=tune --impls=effjax_int8 \
              --out="$RES" --name=kernels_qmm_tune_int8 $CACHE; }
tune_int4() { python3 -m effjax.bench kernels --op=qmm --grid=tune --impls=effjax_int4 \
              --out="$RES" --name=kernels_qmm_tune_int4 $CACHE; }
# gpt_1b (random weights) decoding at batch 1 after 1024 tokens: bf16, and int8 / int4 through
# XLA and through the kernel (needs qwix: ../shared/tools/gpu-wheels qwix, carried as .whl).
decode() { python3 experiments/quantized_matmul/decode.py --out="$RES"; }

# The one-row GEMV kernels (compress.qmm_gemv) against the dot kernels: their checks, the
# decode-shape products side by side (bf16, dot kernel, GEMV kernel; int8 and int4), and gpt_1b
# decoding at batch 1 through each, in one call.
gemv() {
  python3 experiments/quantized_matmul/gpu_check.py --quick > "$RES/gpu_check_gemv.txt" 2>&1
  grep -E "gemv|failed" "$RES/gpu_check_gemv.txt"
  python3 -m effjax.bench kernels --op=qmm --grid=decode --out="$RES" --name=kernels_qmm_gemv \
    --impls=bf16,effjax_int8,gemv_int8,effjax_int4,gemv_int4 $CACHE --profile_dir="$RES/gemv_profile"
  python3 experiments/quantized_matmul/decode.py --repeats=3 --out="$RES/decode_gemv" \
    --variants=bf16,int8:triton:dot,int8:triton:gemv,int4:triton:dot,int4:triton:gemv
}
# The GEMV kernels' tilings at M = 1 (GEMV_TUNE_TILINGS), one kind per call. Traced: a product's
# wall-clock time in these grids (25-40 us) is far above the 1-6 us its bytes take at HBM speed,
# so compare the rows' device time ('traced device ms'), which is the kernel's own cost.
tune_gemv_int8() { python3 -m effjax.bench kernels --op=qmm --grid=tune --impls=gemv_int8 \
                   --out="$RES" --name=kernels_qmm_tune_gemv_int8 $CACHE --repeats=6 \
                   --profile_dir="$RES/tune_gemv_int8_profile"; }
tune_gemv_int4() { python3 -m effjax.bench kernels --op=qmm --grid=tune --impls=gemv_int4 \
                   --out="$RES" --name=kernels_qmm_tune_gemv_int4 $CACHE --repeats=6 \
                   --profile_dir="$RES/tune_gemv_int4_profile"; }

steps=("$@")
if [ "${steps[0]:-all}" = all ]; then steps=(check kernels_int8 kernels_int4 decode); fi
for step in "${steps[@]}"; do
  echo "=== $step"
  "$step" 2>&1 | tail -60
  tar -czf "$OUT/results.tgz" -C "$RES" .
done
