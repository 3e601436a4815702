#!/bin/bash
# The decode-attention kernel on one GPU and what it does to decoding; results go to $RES (packed
# into $OUT/results.tgz after each step, so a run cut short returns what it finished).
#   bash experiments/decode_attention/run_gpu.sh STEP [STEP ...]
#   steps: kernels decode_b1 profile_b1 decode_b16 qmm layout levers gemm_lever kernel_levers
#          kw_rotary fold_norms kw_alternating tiling levers_alt ('all' = the first seven, in
#          order)
set -u
OUT=${OUT:-/tmp/effjax_decode_out}
RES=${RES:-/tmp/effjax_decode_results}
mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1
CACHE=--compilation_cache_dir=/tmp/effjax_xla_cache
DECODE="python3 -m effjax.bench decode --config=configs/gpt_1b.py --methods=plain --repeats=5 \
        --decode_steps=64 --bandwidth_mb=4096 --out=$RES $CACHE"

# The kernel against the float32 reference, then timed and traced beside XLA and cuDNN:
# gpt_1b's and a GQA layer's heads, batch 1 / 16, caches of 1k / 8k, 1 or 5 new tokens.
kernels() { python3 -m effjax.bench kernels --op=decode_attention --repeats=10 --out="$RES" \
            --name=kernels_decode_attention $CACHE --profile_dir=/tmp/effjax_decode_prof; }
# gpt_1b batch-1 decoding through the engine with the kernel ('auto') and without it ('xla').
decode_b1() {
  $DECODE --contexts=1024,8192 --decode_batch=1 --name=decode_gpt_1b_b1_kernel
  $DECODE --contexts=1024,8192 --decode_batch=1 --name=decode_gpt_1b_b1_xla \
    --config.infer.attention_kernel=xla
}
# One traced 64-token loop at batch 1, context 1024, with the kernel: device time per kernel.
profile_b1() { $DECODE --contexts=1024 --decode_batch=1 --profile_dir=/tmp/effjax_decode_trace \
               --name=decode_profile_gpt_1b_b1_kernel; }
decode_b16() {
  $DECODE --contexts=1024,8192 --decode_batch=16 --name=decode_gpt_1b_b16_kernel
  $DECODE --contexts=1024,8192 --decode_batch=16 --name=decode_gpt_1b_b16_xla \
    --config.infer.attention_kernel=xla
}
# bf16 against int8 / int4 weights through the quantized-matmul kernel, now with the
# decode-attention kernel in the step (needs qwix: ../shared/tools/gpu-wheels qwix).
qmm() { python3 experiments/quantized_matmul/decode.py --variants=bf16,int8:triton,int4:triton \
        --out="$RES"; }

# The out projection stored output-major for decoding (infer.output_major='wo', the default)
# against the training layout (''): the engine at batch 1 and 16, the one-row product alone in
# each layout (out_projection.py), and LM.decode on bf16, int8 and int4 weights (the quantized
# ones keep their kernel's layout either way).
layout() {
  for batch in 1 16; do
    for major in wo none; do
      $DECODE --contexts=1024,8192 --decode_batch=$batch \
        --name=decode_gpt_1b_b${batch}_output_major_$major \
        --config.infer.output_major=$([ $major = wo ] && echo wo)
    done
  done
  python3 experiments/decode_attention/out_projection.py \
    2>&1 | tee "$RES/out_projection.txt"
  for major in wo ''; do
    python3 experiments/quantized_matmul/decode.py --variants=bf16,int8:triton,int4:triton \
      --repeats=3 --output_major="$major" --out="$RES/qmm_output_major_${major:-none}"
  done
}

# What else moves batch 1 toward the roofline, one run, context 1k: more weights stored
# output-major (the MLP's, then q/k/v too), and the decode loop captured whole as a CUDA graph
# (XLA's command buffers extended to the while loop, so its ~250 kernels a token launch without
# a host-side gap). The first row (wo only, the default) is the baseline of the others.
levers() {
  for major in wo wo,w_gate,w_up wo,w_gate,w_up,w_down wo,wq,wk,wv,w_gate,w_up,w_down; do
    $DECODE --contexts=1024 --decode_batch=1 --config.infer.output_major=$major \
      --name=levers_major_${major//,/_}
  done
  XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL \
    --xla_gpu_graph_min_graph_size=1" \
    $DECODE --contexts=1024 --decode_batch=1 --name=levers_graph_while
  grep "^| plain" "$RES"/levers_*.md
}
# The one-row products with other GEMM choices by XLA (gate/up ran as 88 tiles of 8 x 128 for
# 132 SMs at 2.85 TB/s in the H200 trace): the default, XLA's autotuner searching every Triton
# tiling (split-K included) instead of its short list, and cuBLAS instead of Triton GEMMs; batch
# 1, 1k and 8k, the cache written by the attention kernel in all three; each traces one more loop.
gemm_lever() {
  local kw="--config.infer.cache_write_in_kernel=True --contexts=1024,8192 --decode_batch=1"
  $DECODE $kw --name=lever_default --profile_dir=/tmp/effjax_lever_default
  XLA_FLAGS="--xla_gpu_exhaustive_tiling_search=true" \
    $DECODE $kw --name=lever_exhaustive --profile_dir=/tmp/effjax_lever_exhaustive
  XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" \
    $DECODE $kw --name=lever_cublas --profile_dir=/tmp/effjax_lever_cublas
  grep "^| plain" "$RES"/lever_*.md
}

# Two kernels folded into the batch-1 step, each alone and together, in one call: the
# decode-attention kernel writing the new keys and values into the cache itself
# (infer.cache_write_in_kernel, 'kw') instead of two dynamic_update_slice writes a layer, and the
# out projection's one-row product through the Pallas GEMV kernel (infer.output_major_kernel,
# 'gk') instead of XLA's row reduction. The engine at batch 1 over 1k and 8k: off, kw, gk, both,
# off again (the drift within the call); batch 16 (where only kw applies): off, kw; then
# LM.decode's bf16 and int4 output-major steps without and with both.
kernel_levers() {
  for run in off:False:False kw:True:False gk:False:True both:True:True off_again:False:False; do
    IFS=: read -r name kw gk <<< "$run"
    # off and both also trace one more loop: device time per kernel name in the row's file
    $DECODE --contexts=1024,8192 --decode_batch=1 --name=levers2_b1_$name \
      --config.infer.cache_write_in_kernel=$kw --config.infer.output_major_kernel=$gk \
      $([ $name = off ] || [ $name = both ] && echo --profile_dir=/tmp/effjax_levers2_$name)
  done
  for kw in False True; do
    $DECODE --contexts=1024,8192 --decode_batch=16 --name=levers2_b16_kw_$kw \
      --config.infer.cache_write_in_kernel=$kw
  done
  grep "^| plain" "$RES"/levers2_*.md
  python3 experiments/quantized_matmul/decode.py --repeats=3 --out="$RES/levers2_qmm" \
    --variants=bf16,bf16+kw+gk,int4:triton:nk,int4:triton:nk+kw+gk
}

# Off / on pairs of one boolean infer option on the engine: alternating twice at batch 1 over 1k
# and 8k (the first 'on' traced: device time per kernel name), then once at batch 16.
#   paired PREFIX OPTION
paired() {
  local prefix=$1 option=$2 name on
  for run in off:False on:True off_again:False on_again:True; do
    IFS=: read -r name on <<< "$run"
    $DECODE --contexts=1024,8192 --decode_batch=1 --name=${prefix}_b1_$name \
      --config.infer.$option=$on $([ $name = on ] && echo --profile_dir=/tmp/effjax_$prefix)
  done
  for on in False True; do
    $DECODE --contexts=1024,8192 --decode_batch=16 --name=${prefix}_b16_$on \
      --config.infer.$option=$on
  done
  grep "^| plain" "$RES"/${prefix}_*.md
}
# The cache write in the kernel, which now also rotates q and the new keys (the step's rotary
# and query-padding kernels folded in too). (Its 2026-12-08 files are named kwr_b1_kw*, from
# this step's first form; the same runs.)
kw_rotary() { paired kwr cache_write_in_kernel; }
# Engine options timed in alternation in one process (bench decode --alternate: rounds in a
# fresh order beside the copy and read probes, so drift moves all alike; ratios and roofline
# fractions are medians of per-round ones), batch 1 (traced: device time per kernel name) and
# batch 16, contexts 1k and 8k.
#   alternating PREFIX OPTION VALUES        one option's values
#   alternating PREFIX -- SPEC [SPEC ...]   zipped lists of several (--alternate=SPEC each)
alternating() {
  local prefix=$1 batch specs=()
  if [ "$2" = -- ]; then
    for spec in "${@:3}"; do specs+=("--alternate=$spec"); done
  else
    specs=("--alternate=infer.$2=$3")
  fi
  for batch in 1 16; do
    python3 -m effjax.bench decode --config=configs/gpt_1b.py --repeats=20 --decode_steps=64 \
      --bandwidth_mb=4096 --out=$RES $CACHE --contexts=1024,8192 --decode_batch=$batch \
      "${specs[@]}" --name=${prefix}_b$batch \
      $([ $batch = 1 ] && echo --profile_dir=/tmp/effjax_$prefix)
  done
  grep -h "^| [a-z_]*=" "$RES"/${prefix}_b*.md
}
# The RMSNorm gains folded into q/k/v and gate/up (infer.fold_norms): do the norm applications'
# kernels go?
fold_norms() { alternating fold_alt fold_norms False,True; }
# The cache written by the attention kernel (the default) against two dynamic_update_slice
# writes a layer, in alternation: the kw_rotary gain without the between-process drift.
kw_alternating() { alternating kw_alt cache_write_in_kernel False,True; }
# The decode-attention kernel's tiling in the step (infer.decode_attention_tiling,
# BLOCK_K:SPLIT:WARPS:STAGES; '' = the default, 64 slots a step, about two programs an SM, 4
# warps, 2 stages): at batch 1 the kernel read gpt_1b's 8 MB a layer at about 1 TB/s (8 us) in
# the last trace; deeper pipelines, more warps, longer or shorter ranges, and one range (no
# merge kernel after it, the kernel normalising itself).
# The three above in one process per batch: the default, the norms folded, the cache write
# outside the kernel, and four tilings (deeper pipeline, more warps, longer blocks, one range).
levers_alt() {
  alternating levers_alt -- infer.fold_norms=False,True,False,False,False,False,False \
    infer.cache_write_in_kernel=True,True,False,True,True,True,True \
    infer.decode_attention_tiling=///64:auto:4:3/64:auto:8:3/128:auto:8:3/64:1:8:3
}
tiling() {
  alternating tiling_alt decode_attention_tiling \
    /64:auto:4:3/64:auto:8:2/64:auto:8:3/128:auto:4:2/128:auto:8:3/32:auto:4:3/64:16:4:2/64:4:4:2/64:1:8:3
}

steps=("$@")
if [ "${steps[0]:-all}" = all ]; then steps=(kernels decode_b1 profile_b1 decode_b16 qmm layout levers); fi
for step in "${steps[@]}"; do
  echo "=== $step"
  "$step" 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tail -40
  tar -czf "$OUT/results.tgz" -C "$RES" .
done
