#!/bin/bash
# Runs named benchmark steps on the GPU machine, most important first, and packs every result file
# into $OUT/results.tgz after each step (so a run cut short still returns what it finished).
#   bash experiments/throughput/run_gpu.sh STEP [STEP ...]
# Steps are the functions below; each is one `python -m effjax.bench ...` command.
set -u
OUT=${OUT:-/tmp/effjax_bench_out}
RES=${RES:-/tmp/effjax_bench_results}
mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1
BENCH="python3 -m effjax.bench train --out=$RES --compilation_cache_dir=/tmp/effjax_xla_cache"
GPT2="$BENCH --config=configs/gpt2_small.py"

gpt2_profile() { $GPT2 --name=gpt2_profile --profile_dir="$RES/gpt2_profile"; }
gpt2_torch() { python3 -m effjax.bench.torch_peer --out="$RES/gpt2_torch_peer.json"; }
gpt2_layout() { $GPT2 --name=gpt2_layout --sweep=model.scan_layers=True,False \
                --sweep=model.output_dtype=float32,bfloat16; }
gpt2_packed() { $GPT2 --name=gpt2_packed --batches=packed; }
gpt2_flags() { $GPT2 --name=gpt2_flags --config.model.scan_layers=False \
               --sweep=xla_flags=--xla_gpu_enable_triton_gemm=false,--xla_gpu_enable_command_buffer=; }
gpt2_batch() { $GPT2 --name=gpt2_batch --config.model.scan_layers=False --sweep=train.batch_size=16,64; }

gpt2_v2() { $GPT2 --name=gpt2_v2 --sweep=model.output_dtype=float32,bfloat16 --sweep=train.batch_size=32,64; }
gpt2_v2_profile() { $GPT2 --name=gpt2_v2_profile --profile_dir="$RES/gpt2_v2_profile"; }
gpt2_v2_triton() { $GPT2 --name=gpt2_v2_triton --config.train.batch_size=64 \
                   --sweep=xla_flags=,--xla_gpu_enable_triton_gemm=false; }
GPT1B="$BENCH --config=configs/gpt_1b.py"
b1_sweep() { $GPT1B --name=gpt1b_sweep --sweep=train.batch_size=8,16 --sweep=model.remat_policy=none,attention_out; }

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
for step in "$@"; do
  echo "=== $step $(date -u +%T)"
  "$step" 2>&1 | tee -a "$OUT/log.txt"
  tar -czf "$OUT/results.tgz" --exclude="*.xplane.pb" -C "$RES" .
done
echo "=== done $(date -u +%T)"
cat "$RES"/*.md 2>/dev/null
