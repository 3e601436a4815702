"""Every config in configs/ through the real command on this machine: train, evaluate, checkpoint,
resume and sample, a few steps each. A table of what happened is printed last and written as
JSON and markdown.

    python3 experiments/gpu_smoke/smoke.py --out=DIR [--steps=4] [--jobs=1] [--only=a,b]

For each configs/NAME.py (base.py, the defaults, is not an experiment) two runs of
`python -m effjax.main --config=configs/NAME.py --workdir=W` at the config's own sizes:
  1. `steps` steps with a checkpoint every steps/2, the held-out evaluation at the end
     (train.eval_batches=1) and a 16-token sample;
  2. the same command with train.steps=steps+2: it must resume from the checkpoint of run 1
     (its log says so) and train the two steps left.
A config whose mesh needs more devices than this machine has is skipped with the reason. Loss
and tokens/s come from the metrics.jsonl the trainer writes (tokens/s: its last progress window,
which excludes the compiling first step). With --jobs > 1 configs run concurrently on the same
device, so tokens/s are then not a benchmark: this is a check that everything runs, the
benchmarks are effjax.bench's.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
MESH_AXES = ('data', 'fsdp', 'tensor', 'expert', 'sequence')


def _load(name: str):
  spec = importlib.util.spec_from_file_location(f'configs.{name}', ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def needed_devices(config) -> int:
  return math.prod(max(int(config.mesh[a]), 1) for a in MESH_AXES)


def _metrics(workdir: pathlib.Path) -> list[dict]:
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _run(cmd: list[str], log: pathlib.Path, timeout: int) -> tuple[int, float]:
  t0 = time.perf_counter()
  with log.open('w') as f:
    try:
      rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout,
                          check=False).returncode
    except subprocess.TimeoutExpired:
      f.write(f'\n[smoke] timed out after {timeout} s\n')
      rc = 124
  return rc, time.perf_counter() - t0


def smoke(name: str, out: pathlib.Path, steps: int, timeout: int, devices: int) -> dict:
  row: dict = {'config': name}
  config = _load(name)
  need = needed_devices(config)
  if need > devices:
    mesh = ' x '.join(f'{a}={config.mesh[a]}' for a in MESH_AXES if int(config.mesh[a]) > 1)
    row['skipped'] = f'needs {need} devices ({mesh}); this machine has {devices}'
    return row
  workdir = out / 'runs' / name
  base = [sys.executable, '-m', 'effjax.main', f'--config=configs/{name}.py',
          f'--workdir={workdir}', '--config.train.log_every=1', '--config.train.eval_every=0',
          '--config.train.eval_batches=1', f'--config.train.checkpoint_every={max(steps // 2, 1)}',
          '--config.generate.max_new_tokens=16', '--config.generate.at_end=True',
          f'--config.optim.warmup_steps={max(steps // 2, 1)}']
  logs = []
  for phase, total in (('train', steps), ('resume', steps + 2)):
    log = out / f'{name}.{phase}.log'
    rc, seconds = _run(base + [f'--config.train.steps={total}'], log, timeout)
    text = log.read_text(errors='replace')
    row[f'{phase}_rc'], row[f'{phase}_s'] = rc, round(seconds, 1)
    logs.append(text)
    if rc:
      row['error'] = next((l for l in reversed(text.splitlines())
                           if 'rror' in l or 'timed out' in l), text.strip()[-300:])[:300]
      break
  train_log = logs[0]
  row['evaluated'] = 'eval at step' in train_log
  row['sampled'] = 'sample:' in train_log
  if len(logs) > 1:
    row['resumed'] = f'resumed from the checkpoint at step {steps}' in logs[1]
  rows = [m for m in _metrics(workdir) if 'train/loss' in m]
  if rows:
    row['loss_first'] = rows[0]['train/loss']
    row['loss_last'] = rows[-1]['train/loss']
    row['last_step'] = rows[-1]['step']
    rates = [m['train/tokens_per_second'] for m in rows if 'train/tokens_per_second' in m]
    if rates:
      row['tokens_per_s'] = rates[-1]
    mem = [m['train/memory_peak_gb'] for m in rows if 'train/memory_peak_gb' in m]
    if mem:
      row['memory_peak_gb'] = max(mem)
  row['ok'] = (not row.get('error') and row.get('resumed', False) and row['evaluated']
               and row['sampled'])
  return row


def table(rows: list[dict]) -> str:
  head = ('config', 'train / resume exit', 'loss first -> last (step)', 'tokens/s',
          'peak mem GB', 'eval / ckpt+resume / sample', 'note')
  lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
  for r in rows:
    if 'skipped' in r:
      lines.append(f"| {r['config']} | skipped | - | - | - | - | {r['skipped']} |")
      continue
    exits = f"{r.get('train_rc', '-')} / {r.get('resume_rc', '-')}"
    loss = (f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} ({r['last_step']})"
            if 'loss_last' in r else '-')
    rate = f"{r['tokens_per_s']:,.0f}" if 'tokens_per_s' in r else '-'
    mem = f"{r['memory_peak_gb']:.1f}" if 'memory_peak_gb' in r else '-'
    yes = lambda k: 'yes' if r.get(k) else 'no'
    checks = f"{yes('evaluated')} / {yes('resumed')} / {yes('sampled')}"
    lines.append(f"| {r['config']} | {exits} | {loss} | {rate} | {mem} | {checks} | "
                 f"{r.get('error', '')} |")
  return '\n'.join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--steps', type=int, default=4)
  parser.add_argument('--jobs', type=int, default=1)
  parser.add_argument('--timeout', type=int, default=420, help='seconds per command')
  parser.add_argument('--only', default='', help='comma-separated config names')
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  names = sorted(p.stem for p in (ROOT / 'configs').glob('*.py')
                 if p.stem not in ('base', '__init__'))
  if args.only:
    wanted = args.only.split(',')
    unknown = sorted(set(wanted) - set(names))
    if unknown:
      print(f'smoke: --only names {unknown}, not configs; allowed: {", ".join(names)}',
            file=sys.stderr)
      return 2
    names = [n for n in names if n in wanted]
  import jax  # pylint: disable=import-outside-toplevel
  devices = jax.device_count()
  device = f'{jax.device_count()} x {jax.devices()[0].device_kind}'
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(out / 'xla_cache'))
  if args.jobs > 1:
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  del jax
  t0 = time.time()
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    futures = {pool.submit(smoke, n, out, args.steps, args.timeout, devices): n for n in names}
    done = []
    for future in concurrent.futures.as_completed(futures):
      r = future.result()
      done.append(r)  # partial results survive a run cut short
      (out / 'smoke.partial.json').write_text(json.dumps(done, indent=1))
      print(f"[smoke] {r['config']}: {'skipped' if 'skipped' in r else ('ok' if r['ok'] else 'FAILED')}"
            f" {r.get('error', '')}", flush=True)
  rows = sorted((f.result() for f in futures), key=lambda r: r['config'])
  meta = {'device': device, 'steps': args.steps, 'jobs': args.jobs,
          'wall_s': round(time.time() - t0, 1), 'command': ' '.join(sys.argv)}
  (out / 'smoke.json').write_text(json.dumps({'meta': meta, 'rows': rows}, indent=1))
  md = table(rows)
  (out / 'smoke.md').write_text(f"{meta}\n\n{md}\n")
  print(md)
  failed = [r['config'] for r in rows if 'skipped' not in r and not r['ok']]
  print(f"{len(rows) - len(failed)} of {len(rows)} configs ran or were skipped with a reason; "
        f"failed: {', '.join(failed) or 'none'}")
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
