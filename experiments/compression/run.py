"""Every compression technique on one trained model: size, decode tokens/s at batch 1, held-out loss.

    python experiments/compression/run.py [--out=/tmp/effjax_compression] [--steps=300]
        [--finetune_steps=60] [--config=configs/default.py] [--set model.d_model=128 ...]

Trains a small byte-level model on the embedded corpus (the Python standard library), then runs
`--mode=compress` once per technique on its checkpoint (the same code path as
`python -m effjax.main --mode=compress`), each into its own directory, and writes
results/<name>.json and results/<name>.md beside this file: one row per technique from its
report.json. On CPU (two cores) the default takes about ten minutes. Decode tokens/s on a CPU
shared with other work is noisy; the ratios that matter are measured on the GPU (README).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

# (row label, compress fields); finetune=True adds --finetune_steps of training after compressing.
TECHNIQUES = [
    ('int8 weight-only (PTQ)', dict(method='int8'), False),
    ('W8A8 (PTQ, calibrated)', dict(method='w8a8'), False),
    ('fp8 e4m3 weight-only (PTQ)', dict(method='fp8'), False),
    ('int4 weight-only, groups of 64 (PTQ)', dict(method='int4', int4_group_size=64), False),
    ('int8 QAT (fake quant, fine-tuned)', dict(method='qat_int8'), True),
    ('magnitude 50%, per layer, fine-tuned', dict(method='magnitude', prune_sparsity=0.5), True),
    ('2:4 structured, fine-tuned', dict(method='2:4'), True),
    # The control for the fine-tuned rows: 'merge' of a dense source copies it unchanged, then the
    # same fine-tuning runs, so (row - this) is what the compression itself costs.
    ('dense, fine-tuned (control: no compression)', dict(method='merge'), True),
    ('SVD 90% energy, fine-tuned', dict(method='lowrank', lowrank_energy=0.9), True),
    ('LoRA r=8 (base frozen), fine-tuned', dict(method='lora', lora_rank=8), True),
    ('distilled student (half the layers)', dict(method='distill', student_model='half',
                                                 distill_temperature=2.0), True),
]


def base_config(args):
  from effjax import config as config_lib
  c = config_lib.load_file(os.path.join(ROOT, args.config))
  c.model.d_model, c.model.num_layers, c.model.mlp_dim = 128, 4, 384
  c.data.seq_len, c.train.batch_size = 128, 8
  c.train.steps, c.train.eval_every, c.train.eval_batches = args.steps, 0, 8
  c.train.checkpoint_every, c.generate.at_end = args.steps, False
  c.compress.decode_context, c.compress.decode_steps = 128, 64
  return config_lib.apply_overrides(c, args.set)


def decode_tokens_per_s(config, workdir: str) -> float:
  """Batch-1 decode tokens/s of the latest checkpoint in workdir (as --mode=compress times it)."""
  import jax
  from effjax.bench import decode as decode_bench
  from effjax.compress import run as compress_run
  from effjax.parallel import sharding as shd
  from effjax.train import trainer
  run = trainer.build_run(config, workdir, read_only=True)
  with jax.set_mesh(run.mesh), shd.axis_rules(run.rules):
    state, _ = trainer._load_latest(run)  # pylint: disable=protected-access
    params = compress_run.decode_params(state['params'], run.config.model.compute_dtype)
    row = decode_bench.time_decode(run.setup.graphdef, params, config.compress.decode_context,
                                   steps=config.compress.decode_steps, repeats=5)
  run.checkpointer.close()
  return row['tokens_per_s']


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', default='/tmp/effjax_compression')
  parser.add_argument('--config', default='configs/default.py')
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--finetune_steps', type=int, default=60)
  parser.add_argument('--finetune_learning_rate', type=float, default=3e-4)
  parser.add_argument('--decode_rounds', type=int, default=3)
  parser.add_argument('--name', default='cpu_tiny')
  parser.add_argument('--results', default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                        'results'),
                      help='where <name>.json and <name>.md go (default: results/ here)')
  parser.add_argument('--only', default='', help='comma-separated methods to run (default all)')
  parser.add_argument('--set', action='append', default=[], help='section.field=value override')
  parser.add_argument('--drop_checkpoints', action='store_true',
                      help="delete each technique's checkpoints (keeping its report and "
                      "records) once its report.json is written "
                      '(a fine-tuned 1B technique leaves about 12 GB of parameters and optimizer '
                      'state, and eleven fill a 64 GB disk); needs --decode_rounds=0, since the '
                      'rounds reload them. The source checkpoint is kept.')
  parser.add_argument('--from_reports', default='',
                      help='a folder of <method>.report.json files (as run_gpu.sh copies them '
                      'out): write the table from those, in the usual row order, without '
                      'training or compressing anything (for a run cut short before its table)')
  args = parser.parse_args()
  if args.from_reports:
    table_from_reports(args)
    return
  if args.drop_checkpoints and args.decode_rounds:
    parser.error('--drop_checkpoints needs --decode_rounds=0: the decode rounds reload every '
                 "technique's checkpoint")

  import jax
  from effjax.compress import run as compress_run
  from effjax.train import trainer

  source = os.path.join(args.out, 'source')
  config = base_config(args)
  started = time.perf_counter()
  trainer.train(config, source)  # resumes (or returns at once) when already trained
  rows = []
  for label, fields, finetune in TECHNIQUES:
    if args.only and fields['method'] not in args.only.split(','):
      continue
    out = os.path.join(args.out, fields['method'].replace(':', '_'))
    if os.path.exists(os.path.join(out, 'report.json')):
      with open(os.path.join(out, 'report.json'), encoding='utf-8') as f:
        report = json.load(f)
    else:
      if os.path.lexists(out):
        _remove_interrupted(out, fields['method'])
      c = base_config(args)
      c.mode = 'compress'
      for key, value in fields.items():
        c.compress[key] = value
      if c.compress.student_model == 'half':  # the student: half the source's layers
        c.compress.student_model = f'num_layers={max(1, c.model.num_layers // 2)}'
      c.compress.out_workdir = out
      c.compress.finetune_steps = args.finetune_steps if finetune else 0
      c.compress.finetune_learning_rate = args.finetune_learning_rate
      report = compress_run.compress(c, source)
    if args.drop_checkpoints:
      for entry in os.listdir(out):
        if entry not in ('report.json', 'report.md', 'compression.json', 'config.json'):
          path = os.path.join(out, entry)
          if os.path.isdir(path):
            shutil.rmtree(path)
          else:
            os.remove(path)
    rows.append((label, report))

  # Decode speed again, every model in one process, interleaved over rounds, best round kept:
  # the reports' single measurements each ran at a different moment of a shared machine.
  # The reports' own measurements count too (--decode_rounds=0 keeps only those: on a dedicated
  # GPU one measurement per model is enough, and a rerun after an interruption stays short).
  speeds = reported_speeds(rows)
  for _ in range(args.decode_rounds):
    speeds[SOURCE] = max(speeds[SOURCE], decode_tokens_per_s(config, source))
    for _, r in rows:
      w = r['out_workdir']
      if not os.path.isdir(os.path.join(w, 'checkpoints')):  # dropped (--drop_checkpoints)
        continue  # its report's own measurement stands
      speeds[w] = max(speeds[w], decode_tokens_per_s(config, w))
  table = build_table(rows, speeds)
  env = {'device': jax.devices()[0].device_kind, 'platform': platform.platform(),
         'jax': jax.__version__, 'command': ' '.join(sys.argv),
         'seconds': time.perf_counter() - started, 'config': config.to_dict()}
  write_table(args.results, args.name, table, env)


SOURCE = 'source'  # the source model's key in the decode speeds below


# What a `--mode=compress` run writes into its directory before report.json, its last file.
_RUN_FILES = {'checkpoints', 'compression.json', 'config.json', 'metrics.jsonl', 'summary.json',
              'tb', 'report.md'}


def _remove_interrupted(out: str, method: str) -> None:
  """Remove a technique directory without report.json that a killed run of this study left,
  so the technique runs again; anything else (a symlink, a file, a directory holding entries a
  compress run does not write) is one clear error and stays as it is."""
  entries = set(os.listdir(out)) if os.path.isdir(out) and not os.path.islink(out) else None
  if entries is None or entries - _RUN_FILES:
    raise SystemExit(
        f'{out} exists without report.json and does not look like an interrupted run of this '
        f'study (it holds {sorted(entries or []) or "no directory"}; a run writes only '
        f'{", ".join(sorted(_RUN_FILES))} before report.json); move it away or choose another '
        '--out, nothing was removed')
  print(f'{out}: no report.json (an interrupted run); removing it and running {method} again',
        flush=True)
  shutil.rmtree(out)


def reported_speeds(rows) -> dict[str, float]:
  """Decode tokens/s per model from the reports: each compressed model's 'after', and for the
  source the best of the reports' 'before' (every report measured the same source again)."""
  speeds = {SOURCE: max((r['before'].get('decode_tokens_per_s') or 0.0 for _, r in rows),
                        default=0.0)}
  for _, r in rows:
    speeds[r['out_workdir']] = r['after'].get('decode_tokens_per_s') or 0.0
  return speeds


def build_table(rows, speeds: dict[str, float]) -> list[dict]:
  """The source row, then one row per (label, report), with decode speeds from `speeds`."""
  def row(label, m, finetune_steps, key):
    return {'technique': label, 'bytes': m['bytes'], 'decode_bytes': m['decode_bytes'],
            'decode_tokens_per_s': speeds[key], 'report_decode_tokens_per_s':
            m.get('decode_tokens_per_s'), 'loss': m['loss'], 'finetune_steps': finetune_steps}
  if not rows:
    return []
  table = [row('dense source (float32 stored; decoded in its compute dtype)', rows[0][1]['before'],
               0, SOURCE)]
  return table + [row(label, r['after'], r['finetune_steps'], r['out_workdir'])
                  for label, r in rows]


def table_from_reports(args):
  """The table of the techniques whose report is in --from_reports (the reports' own decode
  measurements; the source row from the reports' 'before', which all share, its decode speed
  the best of theirs)."""
  rows, missing = [], []
  for label, fields, _ in TECHNIQUES:
    path = os.path.join(args.from_reports, fields['method'].replace(':', '_') + '.report.json')
    if not os.path.exists(path):
      missing.append(fields['method'])
      continue
    with open(path, encoding='utf-8') as f:
      rows.append((label, json.load(f)))
  if not rows:
    raise SystemExit(f'--from_reports={args.from_reports}: no <method>.report.json file there '
                     f'(methods: {", ".join(f["method"] for _, f, _ in TECHNIQUES)})')
  # The source's path and step, and its held-out loss and size: a source re-trained at the same
  # path (GPU training is not bit-reproducible) is a different model, and its reports another table.
  sources = {json.dumps(dict(r['source'], loss=r['before']['loss'], bytes=r['before']['bytes']),
                        sort_keys=True) for _, r in rows}
  if len(sources) > 1:
    raise SystemExit(f'--from_reports={args.from_reports}: the reports come from different '
                     f'source checkpoints ({sorted(sources)}); one table needs one source')

  table = build_table(rows, reported_speeds(rows))
  env = {'device': rows[0][1].get('device'), 'command': ' '.join(sys.argv),
         'from_reports': sorted(os.listdir(args.from_reports)), 'not_run': missing,
         'source': rows[0][1]['source']}
  write_table(args.results, args.name, table, env)


def write_table(results: str, name: str, table: list, env: dict) -> None:
  """<results>/<name>.json (rows + environment) and <results>/<name>.md."""
  if not table:
    raise SystemExit('no technique ran (see --only), so there is no table to write')
  os.makedirs(results, exist_ok=True)
  with open(os.path.join(results, f'{name}.json'), 'w', encoding='utf-8') as f:
    json.dump({'environment': env, 'rows': table}, f, indent=2, default=str)
  dense = table[0]
  lines = ['| technique | parameter bytes | weight bytes at decode widths | decode tokens/s (batch 1) '
           '| held-out loss (nats/byte) | fine-tuning steps |', '| --- | --- | --- | --- | --- | --- |']
  for r in table:
    tps = r['decode_tokens_per_s']
    speed = f'{tps / dense["decode_tokens_per_s"]:.2f}x' if dense['decode_tokens_per_s'] else '-'
    lines.append(f'| {r["technique"]} | {r["bytes"]:,} ({r["bytes"] / dense["bytes"]:.2f}x) | '
                 f'{r["decode_bytes"]:,} | {tps:.0f} ({speed}) | '
                 f'{r["loss"]:.4f} | {r["finetune_steps"]} |')
  with open(os.path.join(results, f'{name}.md'), 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
