"""effjax benchmarks: `python -m effjax.bench <what> [flags]`.

    python -m effjax.bench train --config=configs/gpt2_small.py [--config.train.batch_size=64]
        [--sweep=model.remat_policy=none,dots] [--batches=synthetic|packed|pipeline]
        [--alternate=model.pattern=attention:mlp,flash:mlp]
        [--out=experiments/throughput/results] [--name=gpt2_small] [--profile_dir=DIR]

    python -m effjax.bench kernels --op=attention [--grid=default|tiny] [--impls=effjax,cudnn]
        [--repeats=20] [--out=experiments/kernels/results] [--name=kernels_attention]

    python -m effjax.bench decode --config=configs/gla.py --contexts=1024,4096,16384,32768
        [--decode_steps=64] [--decode_batch=1] [--repeats=5]
        [--methods=plain,early_exit,self_speculative,speculative --draft_config=configs/x.py
         --target_workdir=DIR --draft_workdir=DIR --exit_threshold=0.9]
        [--alternate=infer.fold_norms=False,True]

Results go to <out>/<name>.json (device, versions, command, full config per row) and
<out>/<name>.md (a table to paste beside a claim); existing files are never overwritten. A
persistent XLA compilation cache is on by default (--compilation_cache_dir; '' turns it off).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

WHAT = ('train', 'kernels', 'decode')

_CONFIG = config_flags.DEFINE_config_file('config', None, 'train: experiment config file '
                                          '(configs/*.py).', lock_config=True)
_SWEEP = flags.DEFINE_multi_string(
    'sweep', [], 'KEY=V1,V2,...: run every combination of the listed values (KEY is a config '
    'field such as train.batch_size, or xla_flags). Repeat the flag for more axes.')
_BATCHES = flags.DEFINE_enum('batches', 'synthetic', ['synthetic', 'packed', 'pipeline'],
                             'Where batches come from (see effjax/bench/train.py).')
_WARMUP = flags.DEFINE_integer('warmup_steps', 3, 'Steps run after compiling, before timing.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Steps per timed window.')
_REPEATS = flags.DEFINE_integer('repeats', None, 'Timed windows (train, default 3) or timed calls '
                                '(kernels, default 20); the median is reported.')
_OUT = flags.DEFINE_string('out', 'bench_results', 'Directory for the JSON and markdown results.')
_NAME = flags.DEFINE_string('name', None, 'File stem of the results (default: train_<config> or '
                            'kernels_<op>[_<grid>]).')
_PROFILE = flags.DEFINE_string('profile_dir', '', 'If set, trace with jax.profiler here and write '
                               'a per-op device-time summary (summary.txt): train traces 3 steps; '
                               'kernels traces 3 calls of every case, each in a subfolder, and '
                               'adds the top kernels to its rows; decode --methods traces one '
                               'loop per row and prints its top kernels.')
_CACHE = flags.DEFINE_string('compilation_cache_dir',
                             os.path.join(os.path.expanduser('~'), '.cache', 'effjax', 'xla'),
                             "Persistent XLA compilation cache; '' disables it.")
_OP = flags.DEFINE_string('op', 'attention',
                          'kernels: the op to benchmark (see OPS in effjax/bench/kernels.py).')
_GRID = flags.DEFINE_string('grid', 'default', "kernels: 'default' (the GPU shapes), 'tiny' "
                            "(CPU-sized, seconds) or an op's own grid (attention: 'targets', "
                            "'quick').")
_IMPLS = flags.DEFINE_list('impls', [],
                           "kernels: implementations to run (default: all of the op's).")
_CONTEXTS = flags.DEFINE_list('contexts', ['1024', '4096', '16384', '32768'],
                              'decode: context lengths to decode after.')
_DECODE_STEPS = flags.DEFINE_integer('decode_steps', 64, 'decode: tokens per timed loop.')
_DECODE_BATCH = flags.DEFINE_integer('decode_batch', 1, 'decode: sequences decoded together.')
_METHODS = flags.DEFINE_list('methods', [], 'decode: rows per method through the decoding engine '
                             '(plain, early_exit, self_speculative, speculative; see '
                             'effjax/bench/decode_methods.py); empty = the context rows only.')
_DRAFT_CONFIG = flags.DEFINE_string('draft_config', '', 'decode: the speculative draft model\'s '
                                    'config file (default: the target config itself).')
_TARGET_WORKDIR = flags.DEFINE_string('target_workdir', '', 'decode: a trained checkpoint of '
                                      '--config to load (default: random weights).')
_DRAFT_WORKDIR = flags.DEFINE_string('draft_workdir', '', 'decode: a trained checkpoint of '
                                     '--draft_config (default: random weights).')
_EXIT_THRESHOLD = flags.DEFINE_float('exit_threshold', None, 'decode: early-exit threshold '
                                     '(default: config.infer.exit_threshold).')
_ALTERNATE = flags.DEFINE_multi_string(
    'alternate', [], 'KEY=V1,V2,...: time each value in one process, in alternation, so drift '
    'during the run moves every variant alike; ratios to the first value are medians of '
    'per-round ratios. Repeat the flag to change several fields together (lists zipped: the '
    'i-th variant takes each i-th value). decode: infer options that change the engine (e.g. '
    'infer.fold_norms=False,True), plain decoding beside the bandwidth probes, --repeats '
    'rounds (default 20; effjax/bench/decode_methods.py). train: config fields, --repeats '
    'rounds of one window each (default 5), speedups as ratios of tokens/s. Values are split on '
    '"/" instead of "," where one holds commas (infer.output_major=wo/wo,w_down).')
_BANDWIDTH_MB = flags.DEFINE_integer('bandwidth_mb', 512, 'decode: size of the timed device '
                                     'copy that measures memory bandwidth.')
# Internal: a sweep's child process writes its one row here.
_ROW_FILE = flags.DEFINE_string('row_file', '', 'internal: write the result row here')
_VARIANT = flags.DEFINE_string('variant', '{}', 'internal: the sweep variant of this child')


def _child_argv(argv: list[str]) -> list[str]:
  """This command's flags minus those the parent handles (sweep, outputs)."""
  drop = ('--sweep', '--out', '--name', '--row_file', '--variant')
  out = []
  for arg in argv[1:]:
    if arg == 'train' or any(arg == d or arg.startswith(d + '=') for d in drop):
      continue
    out.append(arg)
  return out


def _use_compilation_cache() -> None:
  if _CACHE.value:
    import jax
    jax.config.update('jax_compilation_cache_dir', _CACHE.value)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def _kernels() -> None:
  from effjax.bench import kernels as kernel_bench
  from effjax.bench import results

  try:
    op = kernel_bench.get_op(_OP.value)
    if _GRID.value not in op.grids:
      raise ValueError(f'--grid={_GRID.value!r} is not a grid of --op={op.name}; allowed: '
                       f'{", ".join(op.grids)}')
    impls = kernel_bench.select_impls(op, _IMPLS.value)
  except ValueError as e:
    print(f'effjax.bench kernels: {e}', file=sys.stderr)
    sys.exit(2)
  _use_compilation_cache()
  grid_suffix = '' if _GRID.value == 'default' else f'_{_GRID.value}'
  stem = _NAME.value or f'kernels_{op.name}{grid_suffix}'
  # Each row is also appended to <out>/<stem>.partial.jsonl as soon as it is measured, so a run
  # cut short (a time limit, a crash in a later case) keeps what it finished.
  os.makedirs(_OUT.value, exist_ok=True)
  partial = os.path.join(_OUT.value, f'{stem}.partial.jsonl')

  def log(line: str, row=None) -> None:
    print(line, flush=True)
    if row is not None:
      with open(partial, 'a', encoding='utf-8') as f:
        f.write(json.dumps(row, default=str) + '\n')

  rows = kernel_bench.run(op, grid=_GRID.value, impls=impls, repeats=_REPEATS.value or 20,
                          log=log, profile_dir=_PROFILE.value)
  title = f'Kernel benchmark: {op.name} ({_GRID.value} grid)'
  json_path, md_path = results.write(_OUT.value, stem, results.environment(), rows,
                                     kernel_bench.columns(op), title)
  os.remove(partial)
  print(f'wrote {json_path} and {md_path}')
  print(kernel_bench.summary(rows, op))


def _decode(config) -> None:
  from effjax import config as config_lib
  from effjax.bench import decode as decode_bench
  from effjax.bench import decode_methods, results

  try:
    config_lib.validate(config)
    contexts = [int(c) for c in _CONTEXTS.value]
    if not contexts or min(contexts) < 1:
      raise ValueError(f'--contexts={",".join(_CONTEXTS.value)}: give positive lengths')
    if _ALTERNATE.value and _METHODS.value not in ([], ['plain']):
      raise ValueError(f'--alternate times plain decoding only; got '
                       f'--methods={",".join(_METHODS.value)}')
    if _ALTERNATE.value:
      decode_methods.alternate_configs(config, _ALTERNATE.value)
      unused = [flag for flag, given in (('--draft_config', _DRAFT_CONFIG.value),
                                         ('--draft_workdir', _DRAFT_WORKDIR.value),
                                         ('--exit_threshold', _EXIT_THRESHOLD.value is not None))
                if given]
      if unused:
        raise ValueError(f'--alternate times plain decoding: {", ".join(unused)} would be '
                         f'ignored')
      if _REPEATS.value is not None and _REPEATS.value < 1:
        raise ValueError(f'--repeats={_REPEATS.value}: --alternate needs at least one round')
    if config.infer.fold_norms and not (_METHODS.value or _ALTERNATE.value):
      raise ValueError('--config.infer.fold_norms=True applies to the decoding engine, which '
                       'only the --methods rows run (e.g. --methods=plain); the context rows '
                       'time LM.decode')
  except (config_lib.ConfigError, ValueError) as e:
    print(f'effjax.bench decode: {e}', file=sys.stderr)
    sys.exit(2)
  _use_compilation_cache()
  config_file = config_flags.get_config_filename(flags.FLAGS['config'])
  name = os.path.splitext(os.path.basename(config_file.split(':')[0]))[0]
  if _METHODS.value or _ALTERNATE.value:
    _decode_methods(config, contexts, name)
    return
  rows = decode_bench.run(config, contexts, steps=_DECODE_STEPS.value, batch=_DECODE_BATCH.value,
                          repeats=_REPEATS.value or 5)
  json_path, md_path = results.write(_OUT.value, _NAME.value or f'decode_{name}',
                                     results.environment(), rows, decode_bench.COLUMNS,
                                     f'Decoding throughput: {name} ({config.model.pattern})')
  with open(md_path, encoding='utf-8') as f:
    print(f.read())
  print(f'wrote {json_path} and {md_path}')


def _decode_methods(config, contexts, name: str) -> None:
  """decode --methods=... (one row per (context, method)) or --alternate=... (one per (context,
  value)): effjax/bench/decode_methods.py."""
  from effjax.bench import decode_methods
  from effjax.infer import cli
  from effjax.train import trainer

  bad = [m for m in _METHODS.value if m not in decode_methods.METHODS]
  if bad:
    print(f'effjax.bench decode: --methods={",".join(_METHODS.value)}: unknown {bad[0]!r}; '
          f'allowed: {", ".join(decode_methods.METHODS)}', file=sys.stderr)
    sys.exit(2)

  def trained(cfg, workdir):
    run = trainer.build_run(cfg, workdir)
    with jax.set_mesh(run.mesh), shd.axis_rules(run.rules):
      state, _ = trainer._load_latest(run)  # pylint: disable=protected-access
    return run.setup.graphdef, state['params']

  import jax
  from effjax.parallel import sharding as shd
  draft_config = cli.load_config_file(_DRAFT_CONFIG.value) if _DRAFT_CONFIG.value else None
  params = trained(config, _TARGET_WORKDIR.value) if _TARGET_WORKDIR.value else None
  draft_params = (trained(draft_config or config, _DRAFT_WORKDIR.value) if _DRAFT_WORKDIR.value
                  else None)
  if _ALTERNATE.value:
    rows = decode_methods.alternate(config, contexts, _ALTERNATE.value,
                                    steps=_DECODE_STEPS.value,
                                    batch=_DECODE_BATCH.value,
                                    rounds=20 if _REPEATS.value is None else _REPEATS.value,
                                    params=params, bandwidth_mb=_BANDWIDTH_MB.value,
                                    profile_dir=_PROFILE.value)
    _write_decode_rows(rows, decode_methods.ALTERNATE_COLUMNS,
                       _NAME.value or f'decode_alternate_{name}_b{_DECODE_BATCH.value}',
                       f'Decoding, {" ".join(_ALTERNATE.value)} in alternation: {name} '
                       f'({config.model.pattern}), batch {_DECODE_BATCH.value}')
    return
  threshold = (config.infer.exit_threshold if _EXIT_THRESHOLD.value is None
               else _EXIT_THRESHOLD.value)
  rows = decode_methods.run(config, contexts, _METHODS.value, steps=_DECODE_STEPS.value,
                            batch=_DECODE_BATCH.value, repeats=_REPEATS.value or 5, params=params,
                            draft_config=draft_config, draft_params=draft_params,
                            gamma=config.infer.gamma, exit_threshold=threshold,
                            bandwidth_mb=_BANDWIDTH_MB.value, profile_dir=_PROFILE.value)
  _write_decode_rows(rows, decode_methods.COLUMNS,
                     _NAME.value or f'decode_methods_{name}_b{_DECODE_BATCH.value}',
                     f'Decoding methods: {name} ({config.model.pattern}), batch '
                     f'{_DECODE_BATCH.value}')


def _write_decode_rows(rows, columns, stem: str, title: str) -> None:
  from effjax.bench import results
  json_path, md_path = results.write(_OUT.value, stem, results.environment(), rows, columns,
                                     title)
  for row in rows:
    if row.get('profile_summary'):
      print(f"--- {row.get('variant', row['method'])} context {row['context']}: device time "
            f"per kernel")
      print(row['profile_summary'])
  with open(md_path, encoding='utf-8') as f:
    print(f.read())
  print(f'wrote {json_path} and {md_path}')


def main(argv):
  if len(argv) != 2 or argv[1] not in WHAT:
    print(f'effjax.bench: say what to benchmark: one of {", ".join(WHAT)} (got '
          f'{" ".join(argv[1:]) or "nothing"})', file=sys.stderr)
    sys.exit(2)
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  if argv[1] == 'kernels':
    _kernels()
    return
  if argv[1] == 'decode':
    if _CONFIG.value is None:
      print('effjax.bench: --config=configs/<experiment>.py is required', file=sys.stderr)
      sys.exit(2)
    _decode(_CONFIG.value)
    return
  from effjax import config as config_lib
  from effjax.bench import results
  from effjax.bench import train as train_bench

  config = _CONFIG.value
  if config is None:
    print('effjax.bench: --config=configs/<experiment>.py is required', file=sys.stderr)
    sys.exit(2)
  try:
    variants = train_bench.parse_sweep(_SWEEP.value)
    if _ALTERNATE.value:
      if _SWEEP.value:
        raise ValueError('--sweep and --alternate are two ways to compare variants: give one')
      if _PROFILE.value:
        raise ValueError('--profile_dir traces one config\'s steps: not with --alternate')
      if _REPEATS.value is not None and _REPEATS.value < 1:
        raise ValueError(f'--repeats={_REPEATS.value}: --alternate needs at least one round')
      alternated = train_bench.alternate_configs(config, _ALTERNATE.value)
  except (ValueError, config_lib.ConfigError) as e:
    print(f'effjax.bench: {e}', file=sys.stderr)
    sys.exit(2)
  config_file = config_flags.get_config_filename(flags.FLAGS['config'])
  config_name = os.path.splitext(os.path.basename(config_file.split(':')[0]))[0]
  stem = _NAME.value or f'train_{config_name}'

  if _ALTERNATE.value:
    _use_compilation_cache()
    rows = train_bench.measure_alternating(
        [(train_bench.variant_name(variant), changed) for variant, changed in alternated],
        batches=_BATCHES.value, warmup_steps=_WARMUP.value, steps=_STEPS.value,
        rounds=5 if _REPEATS.value is None else _REPEATS.value)
    for row, (variant, _) in zip(rows, alternated):
      row['overrides'] = variant
    env = results.environment()
    title = f'Training throughput in alternation: {config_name}'
    columns = train_bench.COLUMNS[:-1] + train_bench.ALTERNATE_COLUMNS + train_bench.COLUMNS[-1:]
    json_path, md_path = results.write(_OUT.value, stem, env, rows, columns, title)
    with open(md_path, encoding='utf-8') as f:
      print(f.read())
    print(f'wrote {json_path} and {md_path}')
    return
  if len(variants) > 1:
    env, rows = train_bench.run_sweep(variants, _child_argv(sys.argv))
    env = env or {'device_kind': '?', 'platform': '?', 'num_devices': '?', 'jax': '?',
                  'flax': '?', 'optax': '?', 'git_commit': None, 'date_utc': '?'}
    env['command'] = 'python -m effjax.bench ' + ' '.join(sys.argv[1:])
  else:
    _use_compilation_cache()
    try:
      config_lib.validate(config)
    except config_lib.ConfigError as e:
      print(f'effjax.bench: config error: {e}', file=sys.stderr)
      sys.exit(2)
    variant = json.loads(_VARIANT.value) or (variants[0] if variants else {})
    row = train_bench.run_one(config, variant, batches=_BATCHES.value,
                              warmup_steps=_WARMUP.value, steps=_STEPS.value,
                              repeats=_REPEATS.value or 3, profile_dir=_PROFILE.value)
    env = results.environment()
    if row.get('profile_summary'):
      print(row['profile_summary'])
    if _ROW_FILE.value:
      with open(_ROW_FILE.value, 'w', encoding='utf-8') as f:
        json.dump({'environment': env, 'row': row}, f, default=str)
      return
    rows = [row]
  title = f'Training throughput: {config_name}'
  json_path, md_path = results.write(_OUT.value, stem, env, rows, train_bench.COLUMNS, title)
  with open(md_path, encoding='utf-8') as f:
    print(f.read())
  print(f'wrote {json_path} and {md_path}')


if __name__ == '__main__':
  app.run(main)
