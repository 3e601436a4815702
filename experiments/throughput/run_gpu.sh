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
NOTRITON="--xla_gpu_enable_triton_gemm=false"
gpt2_chunk() { XLA_FLAGS=$NOTRITON $GPT2 --name=gpt2_chunk --config.train.batch_size=64 \
               --sweep=train.loss_chunk_size=0,256 --sweep=model.output_dtype=float32,bfloat16; }
b1_chunk() { XLA_FLAGS=$NOTRITON $GPT1B --name=gpt1b_chunk --config.train.loss_chunk_size=512 \
             --sweep=train.batch_size=8,16 --sweep=model.remat_policy=none,attention_out; }
gpt2_final() { XLA_FLAGS=$NOTRITON $GPT2 --name=gpt2_final --profile_dir="$RES/gpt2_final_profile"; }
gpt2_torch64() { python3 -m effjax.bench.torch_peer --batch=64 --out="$RES/gpt2_torch_peer_b64.json"; }
b1_final() { XLA_FLAGS=$NOTRITON $GPT1B --name=gpt1b_final --sweep=train.batch_size=16,24,32; }
b1_remat() { XLA_FLAGS=$NOTRITON $GPT1B --name=gpt1b_remat --sweep=model.remat_policy=attention_out,full; }
# Largest model on an 80 GB GPU: the allocator capped at 81559 MiB of the H200's 143771 MiB (an
# H100 80GB's memory), full remat, scanned layers, one 2048-token sequence a step.
mem_study() { XLA_PYTHON_CLIENT_MEM_FRACTION=0.567 XLA_FLAGS=$NOTRITON $GPT1B --name=memory_80gb \
              --config.model.d_model=3072 --config.model.num_heads=24 --config.model.num_kv_heads=24 \
              --config.model.mlp_dim=8192 --config.model.scan_layers=True \
              --config.model.remat_policy=full --config.train.batch_size=1 --warmup_steps=1 \
              --steps=3 --repeats=2 --sweep=model.num_layers=30,34,38,42; }
# Two GPUs: the same per-GPU batch (16 x 2048) on one GPU, data-parallel and FSDP.
LHS="--xla_gpu_enable_latency_hiding_scheduler=true"
b1_1gpu() { CUDA_VISIBLE_DEVICES=0 XLA_FLAGS=$NOTRITON $GPT1B --name=gpt1b_1gpu; }
b1_dp2() { $GPT1B --name=gpt1b_dp2 --config.train.batch_size=32 --config.mesh.data=2 \
           --sweep=xla_flags="$NOTRITON","$NOTRITON $LHS"; }
b1_fsdp2() { $GPT1B --name=gpt1b_fsdp2 --config.train.batch_size=32 --config.mesh.data=1 \
             --config.mesh.fsdp=2 --sweep=xla_flags="$NOTRITON","$NOTRITON $LHS"; }
gpt2_bf16chunk() { CUDA_VISIBLE_DEVICES=0 XLA_FLAGS=$NOTRITON $GPT2 --name=gpt2_bf16chunk \
                   --sweep=model.output_dtype=float32,bfloat16; }
mem_edge() { CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.567 XLA_FLAGS=$NOTRITON \
             $GPT1B --name=memory_80gb_edge --config.model.d_model=3072 --config.model.num_heads=24 \
             --config.model.num_kv_heads=24 --config.model.mlp_dim=8192 \
             --config.model.scan_layers=True --config.model.remat_policy=full \
             --config.train.batch_size=1 --warmup_steps=1 --steps=3 --repeats=2 \
             --sweep=model.num_layers=44,46; }
gpt2_b128() { XLA_FLAGS=$NOTRITON $GPT2 --name=gpt2_b128 --sweep=train.batch_size=64,128; }
gpt2_torch128() { python3 -m effjax.bench.torch_peer --batch=128 --out="$RES/gpt2_torch_peer_b128.json"; }
b1_sweep() { $GPT1B --name=gpt1b_sweep --sweep=train.batch_size=8,16 --sweep=model.remat_policy=none,attention_out; }

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
nvidia-smi topo -m >> "$OUT/gpu.txt" 2>&1
for step in "$@"; do
  echo "=== $step $(date -u +%T)"
  "$step" 2>&1 | tee -a "$OUT/log.txt"
  tar -czf "$OUT/results.tgz" --exclude="*.xplane.pb" -C "$RES" .
done
echo "=== done $(date -u +%T)"
cat "$RES"/*.md 2>/dev/null
