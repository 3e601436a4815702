#!/bin/bash
# The compression study on one GPU at configs/gpt_1b.py sizes, most important first. Every step
# resumes: a technique whose report.json exists is not run again, so a run cut short is continued
# by the same command. Results go to experiments/compression/results/ (and are copied to $OUT).
#   bash experiments/compression/run_gpu.sh STEP [STEP ...]     (steps: the functions below, or all)
#   'all' is ptq prune memory rest
set -u
OUT=${OUT:-/tmp/effjax_compression_out}
WORK=${WORK:-/tmp/effjax_compression_1b}  # the source checkpoint and one directory per technique
NAME=${NAME:-h200_gpt_1b}  # the table's file name under $RES
RES=experiments/compression/results
mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1

# The source: gpt_1b (1.03B parameters) trained 150 steps of 8 x 2048 tokens on the embedded
# corpus (long enough for the loss rows to mean something, short enough for one call); held-out
# loss over 8 batches; decode timed at batch 1 after a 1024-token context, 64 tokens a loop; the
# distilled student has half the source's layers (8). Each technique's checkpoints are deleted once
# its report is written (eleven fine-tuned 1B checkpoints fill the GPU machine's 64 GB disk); a
# technique a killed call left unfinished is run again from its start.
STUDY="python3 experiments/compression/run.py --config=configs/gpt_1b.py --out=$WORK --steps=150
  --finetune_steps=100 --finetune_learning_rate=1e-4 --decode_rounds=0 --drop_checkpoints --name=$NAME
  --set model.d_model=2048 --set model.num_layers=16 --set model.mlp_dim=5632
  --set data.seq_len=2048 --set train.batch_size=8 --set compress.decode_context=1024
  --set compress.decode_steps=64 --set train.eval_batches=8"

# Post-training quantization: int8 and int4 weight-only (the decode targets), then fp8 and W8A8.
ptq() { $STUDY --only=int8,int4,fp8,w8a8; }
# 2:4 pruning with 100 fine-tuning steps, the dense model fine-tuned the same way (the control),
# and the table of every technique run so far.
prune() { $STUDY --only=int8,int4,fp8,w8a8,2:4,merge; }
# The remaining techniques (QAT, magnitude, SVD, LoRA, the distilled student), each fine-tuned 100
# steps, and the table of all of them; more than one call's time: rerun until it prints the table.
# The dense control and the distilled student run first (the rows a cut-short run missed before);
# the table keeps its usual order.
rest() { $STUDY --only=merge,distill; $STUDY; }
# The distilled student alone (training the source first when $WORK has none). On a fresh machine
# that source is a new training run, so its report goes into a table of its own (run.py
# --from_reports refuses to mix reports whose sources' held-out losses differ).
distill() { $STUDY --only=distill; }
# Peak memory of full fine-tuning vs LoRA (r=8 on all seven projections, base frozen) at the
# config's batch of 16 and at 4; bf16 compute, float32 parameters and Adam moments as configured;
# then LoRA with the frozen base stored in bf16, and both with every block rematerialised.
# A variant whose result file exists is not run again.
memory() {
  local lora="--config.compress.method=lora" bf16="--config.compress.lora_base_dtype=bfloat16"
  local remat="--config.model.remat_policy=full"
  while read -r name flags; do
    [ -f "$RES/finetune_memory_$name.json" ] || python3 -m effjax.bench train \
      --config=configs/gpt_1b.py $flags --sweep=train.batch_size=4,16 --steps=3 --repeats=1 \
      --warmup_steps=1 --out="$RES" --name="finetune_memory_$name"
  done <<EOF_VARIANTS
full
lora $lora
lora_bf16_base $lora $bf16
full_remat $remat
lora_bf16_base_remat $lora $bf16 $remat
EOF_VARIANTS
}

# One peak-memory row per stdin line 'NAME FLAGS...', batch 16, every block rematerialised, the
# loss over chunks of $1 positions; a row whose file exists is not run again.
_memory_rows() {
  local chunk="--config.train.loss_chunk_size=$1 --config.model.remat_policy=full"
  while read -r name flags; do
    [ -f "$RES/finetune_memory_$name.json" ] || python3 -m effjax.bench train \
      --config=configs/gpt_1b.py $flags $chunk --config.train.batch_size=16 --steps=3 \
      --repeats=1 --warmup_steps=1 --out="$RES" --name="finetune_memory_$name"
  done
}

# Both rematerialised variants again at batch 16 with the loss over chunks of 64 positions (the
# config's 512 keeps a [16, 512, 50304] float32 logits block and its gradient alive), and LoRA
# over a base quantized weight-only to int8 / int4 (QLoRA-style, compress.lora_base_dtype); the
# last three also store the frozen embedding and head in bf16 (compress.lora_vocab_dtype).
memory_chunk() {
  _memory_rows 64 <<EOF_VARIANTS
full_remat_chunk64
lora_bf16_base_remat_chunk64 --config.compress.method=lora --config.compress.lora_base_dtype=bfloat16
lora_bf16_vocab_bf16_remat_chunk64 --config.compress.method=lora --config.compress.lora_base_dtype=bfloat16 --config.compress.lora_vocab_dtype=bfloat16
lora_int8_base_remat_chunk64 --config.compress.method=lora --config.compress.lora_base_dtype=int8 --config.compress.lora_vocab_dtype=bfloat16
lora_int4_base_remat_chunk64 --config.compress.method=lora --config.compress.lora_base_dtype=int4 --config.compress.lora_vocab_dtype=bfloat16
EOF_VARIANTS
}

# The same at a loss chunk of 16 positions (the CPU trend above: LoRA's temporaries shrink with
# the chunk), full fine-tuning and the bf16 LoRA with bf16 vocabulary matrices in one call.
memory_chunk16() {
  _memory_rows 16 <<EOF_VARIANTS
full_remat_chunk16
lora_bf16_vocab_bf16_remat_chunk16 --config.compress.method=lora --config.compress.lora_base_dtype=bfloat16 --config.compress.lora_vocab_dtype=bfloat16
EOF_VARIANTS
}

# Full fine-tuning and the bf16 LoRA (bf16 vocabulary) again at batch 16 taken as two
# microbatches of 8 (train.grad_accum_steps=2: the same update from the same 16 sequences). The
# activations that set LoRA's temporaries halve on both sides; full fine-tuning's weights,
# gradients and Adam moments do not, so the ratio shows how much of LoRA's 40% is activations.
memory_accum2() {
  _memory_rows 64 <<EOF_VARIANTS
full_remat_chunk64_accum2 --config.train.grad_accum_steps=2
lora_bf16_vocab_bf16_remat_chunk64_accum2 --config.compress.method=lora --config.compress.lora_base_dtype=bfloat16 --config.compress.lora_vocab_dtype=bfloat16 --config.train.grad_accum_steps=2
EOF_VARIANTS
}

steps=("$@")
if [ "${steps[0]:-all}" = all ]; then steps=(ptq prune memory rest); fi
for step in "${steps[@]}"; do
  echo "=== $step"
  "$step" 2>&1 | tail -30
  cp "$RES/$NAME".* "$RES"/finetune_memory_* "$OUT"/ 2>/dev/null
  for d in "$WORK"/*/; do
    [ -f "$d/report.json" ] && cp "$d/report.json" "$OUT/$(basename "$d").report.json"
  done
done
