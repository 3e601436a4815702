"""Summarises the MoE vs dense runs: held-out loss at equal tokens, cost per token, load balance.

    python experiments/moe/analyze.py RUNS_DIR [--out=DIR]

RUNS_DIR holds one effjax workdir per run (metrics.jsonl + config.json), as run_cpu.sh leaves
them. For every run this reports total and active parameters (from the config, with the same
counters the trainer's MFU uses), forward FLOPs per token, the held-out loss at every evaluation
and at the end, the median step time, and for MoE runs the expert load over training: the largest
and smallest fraction of routed slots any expert of any layer received (1/E each when perfectly
balanced), router entropy and the dropped fraction. Writes results.md, results.json and
curves.png (held-out loss against tokens; expert load against steps) into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics

import ml_collections

from effjax.models.lm import count_params
from effjax.models.moe import expert_mlp_dim
from effjax.train.flops import forward_flops_per_token


def load_run(workdir: str) -> dict:
  evals, train = {}, {}
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    for line in f:
      r = json.loads(line)
      if 'eval/loss' in r:
        evals[r['step']] = r['eval/loss']  # a resumed run may log a step twice: keep the last
      elif 'train/loss' in r:
        train[r['step']] = r
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    config = json.load(f)
  m = ml_collections.ConfigDict(config['model'])
  seq_len, batch = config['data']['seq_len'], config['train']['batch_size']
  is_moe = 'moe' in m.pattern
  steps = sorted(train)
  step_ms = [train[s]['train/step_time_ms'] for s in steps if 'train/step_time_ms' in train[s]]
  run = {
      'name': os.path.basename(workdir.rstrip('/')), 'pattern': m.pattern, 'moe': is_moe,
      'params_total': count_params(m, include_embedding=False),
      'params_active': count_params(m, include_embedding=False, active=True),
      'forward_flops_per_token': forward_flops_per_token(m, seq_len),
      'tokens_per_step': seq_len * batch,
      'evals': sorted(evals.items()), 'final_eval_loss': evals[max(evals)] if evals else None,
      'final_train_loss': train[steps[-1]]['train/loss'] if steps else None,
      'step_ms_median': statistics.median(step_ms) if step_ms else None,
  }
  if is_moe:
    run.update({
        'experts': m.moe_num_experts, 'top_k': m.moe_top_k, 'expert_mlp_dim': expert_mlp_dim(m),
        'capacity_factor': m.moe_capacity_factor, 'aux_loss_weight': m.moe_aux_loss_weight,
        'load': [(s, train[s]['train/moe_load_min'], train[s]['train/moe_load_max'])
                 for s in steps if 'train/moe_load_max' in train[s]],
        'entropy': [(s, train[s]['train/moe_router_entropy']) for s in steps
                    if 'train/moe_router_entropy' in train[s]],
        'dropped': [(s, train[s]['train/moe_dropped_fraction']) for s in steps
                    if 'train/moe_dropped_fraction' in train[s]],
    })
  return run


def _mean_tail(series: list[tuple], index: int, fraction: float = 0.2) -> float:
  """Mean of a logged series over the last `fraction` of training."""
  tail = series[-max(1, int(len(series) * fraction)):]
  return statistics.fmean(row[index] for row in tail)


def table(runs: list[dict]) -> str:
  dense = next((r for r in runs if not r['moe']), None)
  lines = [
      '| run | params (non-embedding) total / active | fwd MFLOPs / token | held-out loss '
      '(nats/byte) | vs dense | step ms (CPU) | expert load min / max, last 20% (1/E = ideal) '
      '| router entropy (nats), last 20% | dropped |',
      '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in runs:
    delta = ('' if dense is None or r is dense or r['final_eval_loss'] is None
             else f"{r['final_eval_loss'] - dense['final_eval_loss']:+.3f}")
    load = entropy = dropped = ''
    if r['moe'] and r['load']:
      load = (f"{_mean_tail(r['load'], 1):.3f} / {_mean_tail(r['load'], 2):.3f} "
              f"(1/E = {1 / r['experts']:.3f})")
      entropy = f"{_mean_tail(r['entropy'], 1):.3f} (max ln E = {math.log(r['experts']):.3f})"
      dropped = f"{_mean_tail(r['dropped'], 1):.1%}"
    lines.append(
        f"| {r['name']} | {r['params_total'] / 1e6:.2f}M / {r['params_active'] / 1e6:.2f}M | "
        f"{r['forward_flops_per_token'] / 1e6:.2f} | {r['final_eval_loss']:.4f} | {delta} | "
        f"{r['step_ms_median']:.0f} | {load} | {entropy} | {dropped} |")
  return '\n'.join(lines)


def eval_table(runs: list[dict]) -> str:
  steps = sorted({s for r in runs for s, _ in r['evals']})
  head = '| step | tokens | ' + ' | '.join(r['name'] for r in runs) + ' |'
  lines = [head, '|' + ' --- |' * (len(runs) + 2)]
  for s in steps:
    cells = [f"{dict(r['evals']).get(s, float('nan')):.4f}" for r in runs]
    lines.append(f"| {s} | {s * runs[0]['tokens_per_step'] / 1e6:.2f}M | " + ' | '.join(cells)
                 + ' |')
  return '\n'.join(lines)


def plot(runs: list[dict], path: str) -> bool:
  try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
  for r in runs:
    steps, losses = zip(*r['evals'])
    ax1.plot([s * r['tokens_per_step'] / 1e6 for s in steps], losses, marker='o', ms=3,
             label=r['name'])
  ax1.set_xlabel('training tokens (M)')
  ax1.set_ylabel('held-out loss (nats/byte)')
  ax1.set_title('held-out loss, equal active FLOPs per token')
  ax1.grid(alpha=0.3)
  ax1.legend()
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for i, r in enumerate(runs):
    if not r['moe'] or not r['load']:
      continue
    c = colors[i % len(colors)]
    steps, lo, hi = zip(*r['load'])
    ax2.plot(steps, hi, color=c, label=f"{r['name']} max")
    ax2.plot(steps, lo, color=c, ls='--', label=f"{r['name']} min")
    ax2.axhline(1 / r['experts'], color='grey', lw=0.8, ls=':')
  ax2.set_xlabel('step')
  ax2.set_ylabel('fraction of routed slots (any expert, any layer)')
  ax2.set_title('expert load over training (dotted: 1/E)')
  ax2.grid(alpha=0.3)
  ax2.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return True


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('runs_dir')
  parser.add_argument('--out', default='.')
  args = parser.parse_args()
  names = sorted(d for d in os.listdir(args.runs_dir)
                 if os.path.exists(os.path.join(args.runs_dir, d, 'metrics.jsonl')))
  runs = [load_run(os.path.join(args.runs_dir, d)) for d in names]
  runs.sort(key=lambda r: (r['moe'], r['name']))  # the dense baseline first
  os.makedirs(args.out, exist_ok=True)
  text = ('## Final held-out loss and cost\n\n' + table(runs) +
          '\n\n## Held-out loss at every evaluation\n\n' + eval_table(runs) + '\n')
  with open(os.path.join(args.out, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(text)
  with open(os.path.join(args.out, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(runs, f, indent=1)
  plotted = plot(runs, os.path.join(args.out, 'curves.png'))
  print(text)
  if not plotted:
    print('(matplotlib is not installed: no curves.png)')


if __name__ == '__main__':
  main()
