"""Summarises the Sophia vs AdamW runs: final losses, steps and time to AdamW's best, overhead.

    python experiments/sophia_vs_adamw/analyze.py RUNS_DIR [--out=DIR] [--bench=BENCH_JSON]
        [--step_ms=adamw=62.3,sophia_g=65.0 --step_ms_source=TEXT]

RUNS_DIR holds one effjax workdir per run (metrics.jsonl + config.json). The target is the best
final held-out loss among the AdamW runs; for every run this reports the first evaluation step at
which its held-out loss reached that target, that step count relative to the best AdamW run's,
the wall-clock to get there (median training step time x steps; evaluation and compilation
excluded), and the per-step time relative to AdamW's (Sophia's Hessian refresh included).

Step times come from --bench (an `effjax.bench train` result file of the same config, measured
alone on the GPU) when it has a row with the run's optimizer, Hessian interval and Hessian rows;
or from --step_ms (milliseconds per optimizer name, e.g. read off a benchmark table, with
--step_ms_source saying where); otherwise from the run's own log, which is only meaningful if the
run had the GPU to itself.
Writes results.md, results.json and, where matplotlib is installed, curves.png into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics


def load_run(workdir: str) -> dict:
  evals, step_ms, win = [], [], None
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    for line in f:
      record = json.loads(line)
      if 'eval/loss' in record:
        evals.append((record['step'], record['eval/loss']))
      if 'train/step_time_ms' in record:
        step_ms.append(record['train/step_time_ms'])
      if 'train/sophia_win_rate' in record:
        win = record['train/sophia_win_rate']
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    config = json.load(f)
  evals = sorted(dict(evals).items())  # a resumed run may log a step twice: keep the last
  return {'name': os.path.basename(workdir.rstrip('/')), 'optimizer': config['optim']['name'],
          'learning_rate': config['optim']['learning_rate'], 'rho': config['optim'].get('rho'),
          'timing_key': _timing_key(config), 'evals': evals,
          'final_loss': evals[-1][1] if evals else None,
          'step_ms': statistics.median(step_ms) if step_ms else None, 'step_ms_from': 'run log',
          'win_rate': win}


def _timing_key(config: dict) -> tuple:
  """What decides a step's cost among the study's runs: the optimizer and Sophia's refresh."""
  o = config['optim']
  if o['name'] == 'adamw':
    return ('adamw',)
  return (o['name'], o.get('hessian_interval', 10), o.get('hessian_rows', 0))


def apply_bench_times(runs: list[dict], bench_json: str) -> None:
  with open(bench_json, encoding='utf-8') as f:
    rows = json.load(f)['rows']
  times = {_timing_key(r['config']): r['step_time_ms'] for r in rows if r.get('step_time_ms')}
  for run in runs:
    if run['timing_key'] in times:
      run['step_ms'], run['step_ms_from'] = times[run['timing_key']], os.path.basename(bench_json)


def summarise(runs: list[dict]) -> tuple[list[dict], float | None]:
  adamw = [r for r in runs if r['optimizer'] == 'adamw' and r['final_loss'] is not None]
  if not adamw:
    return runs, None
  best = min(adamw, key=lambda r: r['final_loss'])
  target = best['final_loss']

  def steps_to(run):
    return next((s for s, loss in run['evals'] if loss <= target), None)

  base_steps, base_ms = steps_to(best), best['step_ms']
  for run in runs:
    run['steps_to_target'] = steps = steps_to(run)
    run['steps_ratio'] = steps / base_steps if steps and base_steps else None
    run['minutes_to_target'] = (steps * run['step_ms'] / 6e4 if steps and run['step_ms']
                                else None)
    run['overhead_pct'] = (100 * (run['step_ms'] / base_ms - 1) if run['step_ms'] and base_ms
                           else None)
    run['best_adamw'] = run is best
  return runs, target


def _fmt(value, spec):
  return '-' if value is None else format(value, spec)


def markdown(runs: list[dict], target: float | None) -> str:
  lines = [f'Target: best AdamW final held-out loss = {_fmt(target, ".4f")}', '',
           '| run | optimizer | lr | rho | final loss | steps to target | x best AdamW | '
           'minutes to target | step ms | step ms from | overhead vs AdamW | win rate |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in sorted(runs, key=lambda r: (r['optimizer'], r['learning_rate'])):
    lines.append(
        f'| {r["name"]}{" (best AdamW)" if r.get("best_adamw") else ""} | {r["optimizer"]} | '
        f'{r["learning_rate"]:g} | {_fmt(r["rho"] if r["optimizer"] != "adamw" else None, "g")} | '
        f'{_fmt(r["final_loss"], ".4f")} | {_fmt(r.get("steps_to_target"), "d")} | '
        f'{_fmt(r.get("steps_ratio"), ".2f")} | {_fmt(r.get("minutes_to_target"), ".1f")} | '
        f'{_fmt(r["step_ms"], ".1f")} | {r["step_ms_from"]} | '
        f'{_fmt(r.get("overhead_pct"), "+.1f")}% | '
        f'{_fmt(r["win_rate"], ".2f")} |')
  return '\n'.join(lines) + '\n'


def plot(runs: list[dict], target: float | None, path: str) -> bool:
  try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  fig, ax = plt.subplots(figsize=(8, 5))
  for r in sorted(runs, key=lambda r: r['name']):
    if r['evals']:
      steps, losses = zip(*r['evals'])
      style = '-' if r['optimizer'] == 'adamw' else ('--' if r['optimizer'] == 'sophia_g' else ':')
      ax.plot(steps, losses, style, label=r['name'])
  if target is not None:
    ax.axhline(target, color='gray', linewidth=0.8)
  ax.set_xlabel('step')
  ax.set_ylabel('held-out loss (nats/byte)')
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return True


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('runs_dir')
  parser.add_argument('--out', default='.')
  parser.add_argument('--bench', default='', help='effjax.bench result JSON with isolated step times')
  parser.add_argument('--step_ms', default='', help='OPTIMIZER=MS,...: isolated step times')
  parser.add_argument('--step_ms_source', default='', help='where the --step_ms figures come from')
  args = parser.parse_args()
  runs = [load_run(os.path.join(args.runs_dir, d)) for d in sorted(os.listdir(args.runs_dir))
          if os.path.exists(os.path.join(args.runs_dir, d, 'metrics.jsonl'))]
  if not runs:
    raise SystemExit(f'no runs (workdirs with metrics.jsonl) under {args.runs_dir}')
  if args.bench:
    apply_bench_times(runs, args.bench)
  if args.step_ms:
    given = dict(item.split('=') for item in args.step_ms.split(','))
    for run in runs:
      if run['optimizer'] in given:
        run['step_ms'] = float(given[run['optimizer']])
        run['step_ms_from'] = args.step_ms_source or '--step_ms'
  runs, target = summarise(runs)
  os.makedirs(args.out, exist_ok=True)
  text = markdown(runs, target)
  with open(os.path.join(args.out, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(text)
  with open(os.path.join(args.out, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump({'target': target, 'runs': runs}, f, indent=2)
  if plot(runs, target, os.path.join(args.out, 'curves.png')):
    text += '\n(curves.png written)\n'
  print(text)


if __name__ == '__main__':
  main()
