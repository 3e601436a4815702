#!/usr/bin/env bash
# MoE vs dense at equal active FLOPs on the embedded corpus: the study's runs, one after another.
#
#   bash experiments/moe/run_cpu.sh [RUNS_DIR]          # default /tmp/moe_runs
#   python experiments/moe/analyze.py RUNS_DIR --out=experiments/moe
#
# Each run is an ordinary effjax workdir; rerunning the script resumes an interrupted run and
# skips finished ones (the trainer ends at once when its last step is checkpointed).
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-/tmp/moe_runs}
mkdir -p "$runs"
config=configs/moe_study.py

run() {  # name, overrides...
  local name=$1; shift
  echo "=== $name: $*"
  python -m effjax.main --config=$config --workdir="$runs/$name" "$@" 2>&1 | tee -a "$runs/$name.log" \
    | grep -E "^(eval|step +[0-9]+00/|effjax)" || true
}

# The dense baseline: SwiGLU 704 in every layer.
run dense --config.model.pattern=attention:mlp
# 8 experts of width 352, top-2, dropless (Mixtral-style routing, fine-grained to equal FLOPs).
run moe_8x2
# The same without the load-balancing loss: how unbalanced does routing get on its own?
run moe_8x2_no_aux --config.model.moe_aux_loss_weight=0.0
# 8 experts of width 704, top-1 (Switch), capacity factor 1.25: tokens over capacity are dropped.
run switch_8x1_cap1.25 --config.model.moe_top_k=1 --config.model.moe_expert_mlp_dim=704 \
  --config.model.moe_capacity_factor=1.25
