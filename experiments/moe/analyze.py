"""Summarises the MoE vs dense runs: held-out loss at equal tokens, cost per token, load balance.

    python experiments/moe/analyze.py RUNS_DIR [--out=DIR]

RUNS_DIR holds one effjax workdir per run, as run_cpu.sh leaves them. For every run: total and
active parameters, forward FLOPs per token, the held-out loss at every evaluation and at the end,
the median step time, and for MoE runs the expert load over training (the largest and smallest
fraction of routed slots any expert of any layer received; 1/E each when perfectly balanced),
router entropy and the dropped fraction. Writes results.md, results.json and curves.png (held-out
loss against tokens; expert load against steps) into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics

from effjax.bench import studies


def _series(run, key):
  return [(r['step'], r[f'train/{key}']) for r in run['train'] if f'train/{key}' in r]


def _tail_mean(series, fraction: float = 0.2) -> float:
  """Mean of a logged series over the last `fraction` of training."""
  tail = series[-max(1, int(len(series) * fraction)):]
  return statistics.fmean(v for _, v in tail)


def table(runs) -> str:
  dense = next((r for r in runs if 'moe' not in r['pattern']), None)
  lines = [
      '| run | params (non-embedding) total / active | fwd MFLOPs / token | held-out loss '
      '(nats/byte) | vs dense | expert load min / max, last 20% of steps | router entropy '
      '(nats), last 20% | dropped slots |',
      '| --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in runs:
    delta = ('' if dense is None or r is dense
             else f"{r['final_eval_loss'] - dense['final_eval_loss']:+.3f}")
    load = entropy = dropped = ''
    if 'moe' in r['pattern']:
      e = r['model'].moe_num_experts
      load = (f"{_tail_mean(_series(r, 'moe_load_min')):.3f} / "
              f"{_tail_mean(_series(r, 'moe_load_max')):.3f} (1/E = {1 / e:.3f})")
      entropy = f"{_tail_mean(_series(r, 'moe_router_entropy')):.3f} (ln E = {math.log(e):.3f})"
      dropped = f"{_tail_mean(_series(r, 'moe_dropped_fraction')):.1%}"
    lines.append(
        f"| {r['name']} | {r['params_total'] / 1e6:.2f}M / {r['params_active'] / 1e6:.2f}M | "
        f"{r['forward_flops_per_token'] / 1e6:.2f} | {r['final_eval_loss']:.4f} | {delta} | "
        f"{load} | {entropy} | {dropped} |")
  return '\n'.join(lines)


def plot(runs, path: str) -> bool:
  plt = studies.pyplot()
  if plt is None:
    return False
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
  studies.plot_eval_curves(ax1, runs, 'held-out loss, equal active FLOPs per token')
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for i, r in enumerate(runs):
    if 'moe' not in r['pattern']:
      continue
    c = colors[i % len(colors)]
    for key, style in (('moe_load_max', '-'), ('moe_load_min', '--')):
      steps, values = zip(*_series(r, key))
      ax2.plot(steps, values, color=c, ls=style, label=f"{r['name']} {key[9:]}")
    ax2.axhline(1 / r['model'].moe_num_experts, color='grey', lw=0.8, ls=':')
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
  runs = sorted(studies.load_runs(args.runs_dir), key=lambda r: ('moe' in r['pattern'], r['name']))
  os.makedirs(args.out, exist_ok=True)
  text = ('## Final held-out loss and cost\n\n' + table(runs) +
          '\n\n## Held-out loss at every evaluation\n\n' + studies.eval_table(runs) + '\n')
  with open(os.path.join(args.out, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(text)
  summary = []
  for r in runs:
    row = {k: v for k, v in r.items() if k not in ('config', 'model', 'train')}
    for key in ('moe_load_min', 'moe_load_max', 'moe_router_entropy', 'moe_dropped_fraction'):
      row[key] = _series(r, key)
    summary.append(row)
  with open(os.path.join(args.out, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=1)
  print(text if plot(runs, os.path.join(args.out, 'curves.png'))
        else text + '\n(matplotlib is not installed: no curves.png)')


if __name__ == '__main__':
  main()
