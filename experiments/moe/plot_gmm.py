"""TFLOP/s of the grouped-matmul implementations against expert count and group skew.

    python experiments/moe/plot_gmm.py experiments/moe/results/kernels_gmm.json [--out=DIR]

Reads a `python -m effjax.bench kernels --op=gmm` result file and draws, for forward and
forward+backward, each implementation's TFLOP/s at every (experts, K, N) shape of the grid, solid
for uniform groups and dashed for skewed ones (Dirichlet(1) shares), the dense einsum of the same
FLOPs as the reference. Writes gmm_tflops.png and prints the ratios the targets are stated in.
"""

from __future__ import annotations

import argparse
import json
import os

from effjax.bench import studies


def _rows(path: str) -> list[dict]:
  with open(path, encoding='utf-8') as f:
    return [r for r in json.load(f)['rows'] if r.get('op') == 'gmm']


def ratios(rows: list[dict]) -> list[str]:
  """One line per (shape, mode): each implementation's uniform and skewed TFLOP/s over the
  einsum's, and effjax over tokamax."""
  out = []
  shapes = list(dict.fromkeys(r['group'] for r in rows))
  for mode in ('fwd', 'fwd+bwd'):
    for shape in shapes:
      got = {(r['impl'], r['variant']): r.get('tflops') for r in rows
             if r['group'] == shape and r['mode'] == mode}
      einsum = got.get(('einsum', 'uniform'))
      parts = [f'{shape} {mode}: einsum {einsum:.0f}' if einsum else f'{shape} {mode}: einsum -']
      for impl in ('effjax', 'tokamax', 'ragged_dot'):
        for variant in ('uniform', 'skewed'):
          t = got.get((impl, variant))
          if t and einsum:
            parts.append(f'{impl} {variant} {t:.0f} ({t / einsum:.2f}x)')
      eff, tok = got.get(('effjax', 'uniform')), got.get(('tokamax', 'uniform'))
      if eff and tok:
        parts.append(f'effjax/tokamax {eff / tok:.2f}x')
      out.append('; '.join(parts))
  return out


def plot(rows: list[dict], path: str) -> bool:
  plt = studies.pyplot()
  if plt is None:
    return False
  shapes = list(dict.fromkeys(r['group'] for r in rows))
  labels = [s.replace('M=16384 ', '').replace(' K=', '\nK=') for s in shapes]
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
  for ax, mode in zip(axes, ('fwd', 'fwd+bwd')):
    for impl, color in (('einsum', 'black'), ('effjax', 'tab:blue'), ('tokamax', 'tab:orange'),
                        ('ragged_dot', 'tab:green')):
      for variant, style in (('uniform', '-'), ('skewed', '--')):
        ys = []
        for shape in shapes:
          hit = [r.get('tflops') for r in rows if r['group'] == shape and r['mode'] == mode
                 and r['impl'] == impl and r['variant'] == variant]
          ys.append(hit[0] if hit and hit[0] else float('nan'))
        if all(y != y for y in ys):
          continue
        ax.plot(range(len(shapes)), ys, style, marker='o', color=color,
                label=f'{impl} ({variant})')
    ax.set_xticks(range(len(shapes)), labels, fontsize=8)
    ax.set_title(f'grouped matmul, 16k rows, bf16: {mode}')
    ax.grid(alpha=0.3)
  axes[0].set_ylabel('TFLOP/s')
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return True


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('results')
  parser.add_argument('--out', default=os.path.dirname(os.path.abspath(__file__)))
  args = parser.parse_args()
  rows = _rows(args.results)
  for line in ratios(rows):
    print(line)
  png = os.path.join(args.out, 'gmm_tflops.png')
  print(f'wrote {png}' if plot(rows, png) else 'matplotlib not installed: no plot')


if __name__ == '__main__':
  main()
