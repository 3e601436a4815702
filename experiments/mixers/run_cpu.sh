#!/usr/bin/env bash
# Softmax attention vs GLA vs Mamba-2 vs a hybrid, ~26-30M parameters each, the same 0.82M tokens.
#
#   bash experiments/mixers/run_cpu.sh [RUNS_DIR]          # default /tmp/mixer_runs
#   python experiments/mixers/analyze.py RUNS_DIR --out=experiments/mixers
#
# Each run is an ordinary effjax workdir; rerunning resumes an interrupted run and skips finished
# ones (re-evaluating them, about a minute each). On two CPU cores a run takes 15-55 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-/tmp/mixer_runs}
mkdir -p "$runs"

run() {  # name, overrides...
  local name=$1; shift
  echo "=== $name: $*"
  python -m effjax.main --config=configs/mixers_study.py --workdir="$runs/$name" "$@" 2>&1 \
    | tee -a "$runs/$name.log" | grep -E "^(eval|effjax)" || true
}

run attention                                   # 'attention:mlp' x 8: 25.7M non-embedding
run gla --config.model.pattern=gla:mlp          # GLA in every layer: 27.8M
# Mamba-2 blocks without MLPs, twice as deep (the Mamba papers' layout): 26.4M.
run mamba2 --config.model.pattern=mamba2:none --config.model.num_layers=16
# Three Mamba-2 blocks to one attention block (Jamba's ratio), twice: 29.3M.
run hybrid '--config.model.pattern=mamba2:mlp, mamba2:mlp, mamba2:mlp, attention:mlp'
# Checks on the shared learning rate: the baseline at twice and half of it, GLA at half.
run attention_lr3e-3 --config.optim.learning_rate=3e-3
run attention_lr7.5e-4 --config.optim.learning_rate=7.5e-4
run gla_lr7.5e-4 --config.model.pattern=gla:mlp --config.optim.learning_rate=7.5e-4
