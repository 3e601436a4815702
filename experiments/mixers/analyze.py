"""Summarises the sequence-mixer runs: held-out loss at the same token budget, size and cost.

    python experiments/mixers/analyze.py RUNS_DIR [--out=DIR]

RUNS_DIR holds one effjax workdir per run (run_cpu.sh). Writes results.md (per run: pattern,
depth, non-embedding parameters, forward FLOPs per token at the training length, final held-out
loss and its difference to the attention baseline, held-out loss at every evaluation),
results.json and curves.png into --out.
"""

from __future__ import annotations

import argparse
import json
import os

from effjax.bench import studies


def table(runs) -> str:
  """Final losses; deltas against the baseline at the shared rate and against the best baseline."""
  base = next((r for r in runs if r['name'] == 'attention'), None)
  baselines = [r for r in runs if r['pattern'] == 'attention:mlp']
  best = min(baselines, key=lambda r: r['final_eval_loss']) if baselines else None
  lines = ['| run | pattern x depth | peak lr | params (non-embedding) | fwd MFLOPs / token | '
           'held-out loss (nats/byte) | vs attention | vs best attention |',
           '| --- | --- | --- | --- | --- | --- | --- | --- |']
  delta = lambda r, ref: ('' if ref is None or r is ref
                          else f"{r['final_eval_loss'] - ref['final_eval_loss']:+.3f}")
  for r in runs:
    lines.append(f"| {r['name']} | `{r['pattern']}` x {r['num_layers']} layers | "
                 f"{r['config']['optim']['learning_rate']:g} | "
                 f"{r['params_total'] / 1e6:.1f}M | {r['forward_flops_per_token'] / 1e6:.1f} | "
                 f"{r['final_eval_loss']:.4f} | {delta(r, base)} | {delta(r, best)} |")
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('runs_dir')
  parser.add_argument('--out', default='.')
  args = parser.parse_args()
  order = {'attention': 0, 'attention_lr7.5e-4': 1, 'attention_lr3e-3': 2, 'gla': 3,
           'gla_lr7.5e-4': 4, 'mamba2': 5, 'hybrid': 6}
  runs = sorted(studies.load_runs(args.runs_dir), key=lambda r: (order.get(r['name'], 9),
                                                                 r['name']))
  for r in runs:  # a run still going is left out, not reported at its last evaluation
    if not r['evals'] or r['evals'][-1][0] < r['config']['train']['steps']:
      print(f"{r['name']}: unfinished (last evaluation at step "
            f"{r['evals'][-1][0] if r['evals'] else 0}), left out")
  runs = [r for r in runs if r['evals'] and r['evals'][-1][0] >= r['config']['train']['steps']]
  os.makedirs(args.out, exist_ok=True)
  text = ('## Final held-out loss\n\n' + table(runs) +
          '\n\n## Held-out loss at every evaluation\n\n' + studies.eval_table(runs) + '\n')
  with open(os.path.join(args.out, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(text)
  with open(os.path.join(args.out, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump([{k: v for k, v in r.items() if k not in ('config', 'model', 'train')}
               for r in runs], f, indent=1)
  plt = studies.pyplot()
  if plt is not None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    studies.plot_eval_curves(ax, runs, 'held-out loss, the same tokens for every mixer')
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, 'curves.png'), dpi=120)
  print(text)


if __name__ == '__main__':
  main()
