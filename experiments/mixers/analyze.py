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
  base = next((r for r in runs if r['name'] == 'attention'), None)
  lines = ['| run | pattern x depth | params (non-embedding) | fwd MFLOPs / token | held-out loss '
           '(nats/byte) | vs attention |', '| --- | --- | --- | --- | --- | --- |']
  for r in runs:
    delta = ('' if base is None or r is base
             else f"{r['final_eval_loss'] - base['final_eval_loss']:+.3f}")
    lines.append(f"| {r['name']} | `{r['pattern']}` x {r['num_layers']} layers | "
                 f"{r['params_total'] / 1e6:.1f}M | {r['forward_flops_per_token'] / 1e6:.1f} | "
                 f"{r['final_eval_loss']:.4f} | {delta} |")
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('runs_dir')
  parser.add_argument('--out', default='.')
  args = parser.parse_args()
  order = {'attention': 0, 'gla': 1, 'mamba2': 2, 'hybrid': 3}
  runs = sorted(studies.load_runs(args.runs_dir), key=lambda r: (order.get(r['name'], 9),
                                                                 r['name']))
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
