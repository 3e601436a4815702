"""Reading finished training runs for a study's tables and plots (experiments/*/analyze.py).

A run is an effjax workdir: config.json and metrics.jsonl (one JSON object per log step, train
and eval records apart). `load_run` returns the held-out curve, the train records by step and the
model's size and cost from the same counters the trainer's MFU uses; `plot_eval_curves` draws the
held-out loss of several runs against training tokens.
"""

from __future__ import annotations

import json
import os
import statistics
from typing import Any

import ml_collections

from effjax.models.lm import count_params
from effjax.train.flops import forward_flops_per_token


def load_run(workdir: str) -> dict[str, Any]:
  evals, train = {}, {}
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    for line in f:
      record = json.loads(line)
      if 'eval/loss' in record:
        evals[record['step']] = record['eval/loss']  # a resumed run may log a step twice
      elif 'train/loss' in record:
        train[record['step']] = record
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    config = json.load(f)
  model = ml_collections.ConfigDict(config['model'])
  seq_len = config['data']['seq_len']
  steps = sorted(train)
  step_ms = [train[s]['train/step_time_ms'] for s in steps if 'train/step_time_ms' in train[s]]
  return {
      'name': os.path.basename(workdir.rstrip('/')), 'config': config, 'model': model,
      'pattern': model.pattern, 'num_layers': model.num_layers,
      'params_total': count_params(model, include_embedding=False),
      'params_active': count_params(model, include_embedding=False, active=True),
      'forward_flops_per_token': forward_flops_per_token(model, seq_len),
      'tokens_per_step': seq_len * config['train']['batch_size'],
      'evals': sorted(evals.items()), 'final_eval_loss': evals[max(evals)] if evals else None,
      'train': [train[s] for s in steps],
      'step_ms_median': statistics.median(step_ms) if step_ms else None,
  }


def load_runs(runs_dir: str) -> list[dict[str, Any]]:
  names = sorted(d for d in os.listdir(runs_dir)
                 if os.path.exists(os.path.join(runs_dir, d, 'metrics.jsonl')))
  return [load_run(os.path.join(runs_dir, d)) for d in names]


def eval_table(runs: list[dict[str, Any]]) -> str:
  """Markdown: held-out loss of every run at every evaluated step."""
  steps = sorted({s for r in runs for s, _ in r['evals']})
  lines = ['| step | tokens | ' + ' | '.join(r['name'] for r in runs) + ' |',
           '|' + ' --- |' * (len(runs) + 2)]
  for s in steps:
    cells = [f"{dict(r['evals']).get(s, float('nan')):.4f}" for r in runs]
    lines.append(f"| {s} | {s * runs[0]['tokens_per_step'] / 1e6:.2f}M | " + ' | '.join(cells)
                 + ' |')
  return '\n'.join(lines)


def plot_eval_curves(ax, runs: list[dict[str, Any]], title: str) -> None:
  for r in runs:
    if not r['evals']:
      continue
    steps, losses = zip(*r['evals'])
    ax.plot([s * r['tokens_per_step'] / 1e6 for s in steps], losses, marker='o', ms=3,
            label=r['name'])
  ax.set_xlabel('training tokens (M)')
  ax.set_ylabel('held-out loss (nats/byte)')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()


def pyplot():
  """matplotlib.pyplot with a file backend, or None where matplotlib is not installed."""
  try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  return plt
