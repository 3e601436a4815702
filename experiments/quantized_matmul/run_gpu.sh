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

# Output-major weights (infer.qmm_output_major) at batch 1 and 16 against bf16 and the [K, N]
# kernels, one process per batch size: the batch-1 comparison with int4 reading 32-bit words in
# one run, and batched decoding of the transposed weights (XLA above one row), which the
# option's default waits for.
nk_batched() {
  for b in 1 16; do
    python3 experiments/quantized_matmul/decode.py --repeats=3 --batch=$b --out="$RES/decode_nk_b$b" \
      --variants=bf16,int4:triton:gemv,int4:triton:nk,int8:triton,int8:triton:nk
  done
}
# The output-major tiles per input width: the down projection (K = 5632, 256 programs at a row
# tile of 8; about 1.2 TB/s for int8 in the H100 trace of results/h100_2026_12_07_nk, taking the
# kernel names in the layer's order) swept alone, and int8's conversion instruction against its
# bytes widening.
nk_tiles() {
  python3 experiments/quantized_matmul/tune_decode.py --nk --kinds=int8,int4 --repeats=3 \
    --out="$RES" --settings=8:512,4:512@5632,2:512@5632,4:256@5632,16:256@5632,8:512:convert
}
# The output-major word kernels with x gathered into word order inside the kernel ('words_x')
# against XLA preparing it ('words'), after their check against the float32 reference: the
# decode step, int4 and int8, each kind's default, words, words_x, words again (the drift).
nk_xprep() {
  python3 experiments/quantized_matmul/gpu_check.py --nk --quick --widen=words_x \
    > "$RES/gpu_check_nk_words_x.txt" 2>&1
  tail -1 "$RES/gpu_check_nk_words_x.txt"
  python3 experiments/quantized_matmul/tune_decode.py --nk --kinds=int4,int8 --repeats=3 \
    --out="$RES" --settings=8:512,8:512:words,8:512:words_x,8:512:words
}
# The optimized HLO of the int4 output-major decode loop: does XLA keep the weights' view as
# 32-bit words a bitcast (no copy), and where does the scaling of x land? Prints the loop
# module's s32 copies / converts and the fusions around the kernel's custom calls.
nk_hlo() {
  local dump=/tmp/effjax_hlo_nk
  rm -rf "$dump"
  XLA_FLAGS="--xla_dump_to=$dump --xla_dump_hlo_as_text" \
    python3 experiments/quantized_matmul/decode.py --repeats=1 --steps=8 --out="$RES/decode_nk_hlo" \
    --variants=int4:triton:nk
  python3 - "$dump" "$RES" <<'PY'
import glob, gzip, re, shutil, sys
files = [f for f in glob.glob(sys.argv[1] + '/*after_optimizations.txt')
         if 'int4_gemv_nk' in open(f, errors='replace').read()]
for path in files:  # the modules holding the kernel, kept (compressed) beside the results
  with open(path, 'rb') as src, gzip.open(sys.argv[2] + '/' + path.rsplit('/', 1)[-1] + '.gz', 'wb') as dst:
    shutil.copyfileobj(src, dst)
for path in files:
  text = open(path, errors='replace').read()
  print(path.rsplit('/', 1)[-1], len(text), 'chars')
  for line in text.splitlines():
    if re.search(r's32\[\d+,\d+.*\b(copy|bitcast-convert|convert)\(', line) or (
        'custom-call' in line and 'gemv_nk' in line):
      print('  ' + line.strip()[:240])
PY
}

steps=("$@")
if [ "${steps[0]:-all}" = all ]; then steps=(check kernels_int8 kernels_int4 decode); fi
for step in "${steps[@]}"; do
  echo "=== $step"
  "$step" 2>&1 | tail -60
  tar -czf "$OUT/results.tgz" -C "$RES" .
done
