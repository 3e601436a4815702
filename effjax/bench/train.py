"""Training-step throughput: steady-state step time, tokens/s, MFU and peak memory of a config.

    python -m effjax.bench train --config=configs/gpt2_small.py [--config.x.y=v ...]
        [--sweep=train.batch_size=16,32 --sweep=model.remat_policy=none,dots]

What is timed is the project's own jitted train step (the one the trainer runs), on batches that
are already on the device, after compilation and warm-up steps: `repeats` windows of `steps`
back-to-back steps each, the device synchronised only at window ends, and the median window
reported (with the spread). Compile time is measured separately (a persistent compilation cache
makes the second run's compile near zero; both are reported).

Batches (--batches):
  synthetic  one random-token causal sequence per row, no document mask: the shape every
             published GPT-2 throughput figure uses (nanoGPT-style runs do not mask documents);
  packed     random documents packed per row with segment ids and restarting positions: what the
             trainer feeds, including the cost of the document mask;
  pipeline   batches from the configured data pipeline, fetched inside the timed window: the
             input pipeline's cost included.

With --sweep, each variant (the cartesian product of the --sweep lists) runs in a fresh
subprocess, so peak-memory figures do not leak between variants and an out-of-memory variant is
recorded as such without ending the sweep. A sweep key `xla_flags` sets XLA_FLAGS for a variant.

With --alternate (config fields only; the lists zipped, so
`--alternate=model.pattern=attention:mlp,flash:mlp --alternate=model.attention_backend=auto,mosaic_gpu`
is two variants), every variant's step is built in one process and the windows are timed in
alternation, a fresh order per round: drift of the GPU's clock during the run (measured at up to
25% on a shared machine) moves every variant alike, and each row's speedup over the first is the
median of per-round ratios. The price: peak memory is the process's (every variant's state is
resident), so read compiled_memory_gb per variant instead.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import numpy as np

COLUMNS = (
    ('name', 'variant', ''),
    ('params_m', 'params (M)', '.1f'),
    ('tokens_per_step', 'tokens/step', ''),
    ('step_time_ms', 'step (ms)', '.1f'),
    ('step_time_spread_pct', 'spread (%)', '.1f'),
    ('tokens_per_second', 'tokens/s', ',.0f'),
    ('mfu_percent', 'MFU (%)', '.1f'),
    ('joules_per_token', 'J/token', '.3g'),
    ('mean_watts', 'power (W)', '.0f'),
    ('energy_method', 'energy from', ''),
    ('peak_memory_gb', 'peak mem (GB)', '.1f'),
    ('compile_s', 'compile (s)', '.1f'),
    ('error', 'error', ''),
)
# --alternate's rows add these (before 'error').
ALTERNATE_COLUMNS = (
    ('speedup_vs_first', 'speedup vs first', '.3f'),
    ('speedup_spread', 'its rounds 25-75%', ''),
    ('rounds', 'rounds', ''),
)


def parse_sweep(specs: Sequence[str]) -> list[dict[str, str]]:
  """['a.b=1,2', 'c=x,y'] -> the 4 variants {a.b: 1, c: x}, ...; [] -> [{}]."""
  axes = []
  for spec in specs:
    key, sep, values = spec.partition('=')
    if not sep or not key:
      raise ValueError(f'--sweep={spec!r}: expected KEY=V1,V2,... (e.g. '
                       f'--sweep=train.batch_size=16,32)')
    axes.append([(key.strip(), v) for v in values.split(',')])
  return [dict(combo) for combo in itertools.product(*axes)]


def alternate_values(values: str) -> list[str]:
  """An --alternate list: values split on '/' when the text holds one (for values that hold
  commas themselves, such as infer.output_major=wo/wo,w_down), else on ','."""
  return values.split('/' if '/' in values else ',')


def parse_alternate(specs: Sequence[str]) -> list[dict[str, str]]:
  """['a.b=1,2', 'c=x,y'] -> the 2 variants {a.b: 1, c: x}, {a.b: 2, c: y} (zipped, not
  crossed: --alternate; each list split by alternate_values); every list as long as the first,
  at least two variants."""
  axes = []
  for spec in specs:
    key, sep, values = spec.partition('=')
    if not sep or '.' not in key:
      raise ValueError(f'--alternate={spec!r}: expected section.field=V1,V2,... (config fields '
                       f'only: xla_flags is the process\'s, use --sweep; e.g. '
                       f'--alternate=model.pattern=attention:mlp,flash:mlp)')
    axes.append([(key.strip(), v) for v in alternate_values(values)])
  lengths = {len(axis) for axis in axes}
  if len(lengths) != 1 or min(lengths) < 2:
    raise ValueError(f'--alternate: every list needs the same number of values, at least two '
                     f'(the i-th variant takes each list\'s i-th value); got '
                     f'{", ".join(specs)}')
  return [dict(combo) for combo in zip(*axes)]


def alternate_configs(config, specs: Sequence[str]) -> list[tuple[dict[str, str], Any]]:
  """--alternate's variants (parse_alternate) with their configs: copies of `config` with each
  variant's values applied and validated, all checked before any is built; two equal variants
  are one ValueError."""
  import copy

  from effjax import config as config_lib
  variants = parse_alternate(specs)
  seen, out = {}, []
  for i, variant in enumerate(variants):
    key = tuple(sorted(variant.items()))
    if key in seen:
      raise ValueError(f'--alternate: variants {seen[key] + 1} and {i + 1} are the same '
                       f'({", ".join(f"{k}={v!r}" for k, v in variant.items())}); give '
                       f'different values')
    seen[key] = i
    changed = config_lib.apply_overrides(copy.deepcopy(config),
                                         [f'{k}={v}' for k, v in variant.items()])
    config_lib.validate(changed)
    out.append((variant, changed))
  return out


def variant_name(variant: dict[str, str]) -> str:
  if not variant:
    return 'base'
  return ' '.join(f'{k.split(".")[-1]}={v or "default"}' for k, v in variant.items())


def _host_batch(config, kind: str, rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
  t, vocab = config.data.seq_len, config.model.vocab_size
  inputs = rng.integers(0, vocab, (rows, t), dtype=np.int32)
  targets = np.roll(inputs, -1, axis=1)
  if kind == 'synthetic':
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (rows, t)).copy()
    return {'inputs': inputs, 'targets': targets, 'positions': positions,
            'weights': np.ones((rows, t), np.float32)}
  # packed: documents of random lengths (mean ~t/4) back to back, the tail of each row padded.
  segment_ids = np.zeros((rows, t), np.int32)
  positions = np.zeros((rows, t), np.int32)
  for r in range(rows):
    start, seg = 0, 1
    while start < t - 1:
      length = int(min(t - start, rng.geometric(4.0 / t)))
      if start + length >= t and seg > 1 and rng.random() < 0.5:
        break  # leave some rows with trailing padding
      segment_ids[r, start:start + length] = seg
      positions[r, start:start + length] = np.arange(length)
      start, seg = start + length, seg + 1
  weights = (segment_ids > 0).astype(np.float32)
  return {'inputs': inputs * (segment_ids > 0), 'targets': targets * (segment_ids > 0),
          'segment_ids': segment_ids, 'positions': positions, 'weights': weights}


def device_op_times(trace_dir: str) -> dict[tuple[str, str], dict[str, tuple[float, int]]]:
  """Device time per event name from the newest jax.profiler trace under trace_dir:
  {(device plane, line): {name: (total ns, count)}}; empty when there is no trace. Off GPU and
  TPU (no '/device:' plane) the CPU client's threads stand in: they run XLA's ops there."""
  import glob

  from jax.profiler import ProfileData
  files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True),
                 key=os.path.getmtime)
  if not files:
    return {}
  data = ProfileData.from_file(files[-1])
  out: dict[tuple[str, str], dict[str, tuple[float, int]]] = {}
  planes = [p for p in data.planes if p.name.startswith('/device:')]
  cpu = not planes
  for plane in planes or [p for p in data.planes if p.name == '/host:CPU']:
    for line in plane.lines:
      if cpu and 'CpuClient' not in line.name:
        continue
      totals: dict[str, list[float]] = {}
      for event in line.events:
        if event.name.startswith('end: '):  # the CPU client's completion markers
          continue
        entry = totals.setdefault(event.name, [0.0, 0])
        entry[0] += event.duration_ns
        entry[1] += 1
      if totals:
        out[(plane.name, line.name)] = {k: (v[0], int(v[1])) for k, v in totals.items()}
  return out


def summarise_profile(trace_dir: str, top: int = 30) -> str:
  """Device time per op name from a jax.profiler trace: where the step's time goes."""
  times = device_op_times(trace_dir)
  if not times:
    return f'no device events in a trace under {trace_dir}'
  out = []
  for (plane, line), totals in times.items():
    busy = sum(ns for ns, _ in totals.values())
    out.append(f'{plane} / {line}: {busy / 1e6:.2f} ms in {len(totals)} names')
    for name, (ns, count) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]:
      out.append(f'  {ns / 1e6:9.3f} ms {100 * ns / max(busy, 1):5.1f}%  x{count:<5d} {name[:140]}')
  return '\n'.join(out)


def trace_once(call, trace_dir: str, top: int = 25) -> str:
  """Runs call() once under jax.profiler into trace_dir (waiting for its result), writes the
  per-kernel summary to trace_dir/summary.txt and returns it."""
  import jax
  with jax.profiler.trace(trace_dir):
    jax.block_until_ready(call())
  summary = summarise_profile(trace_dir, top=top)
  with open(os.path.join(trace_dir, 'summary.txt'), 'w', encoding='utf-8') as f:
    f.write(summary + '\n')
  return summary


@dataclasses.dataclass
class _Prepared:
  """One config's compiled train step, its state and batches, warmed up (measure's first half)."""
  config: Any
  mesh: Any
  rules: Any
  state: Any
  compiled: Any
  next_batch: Callable[[], Any]
  compile_s: float
  memory: Any
  cost: Any
  rows_per_host: int
  first_loss: float
  batches: str
  last_loss: float = float('nan')

  def window(self, steps: int) -> tuple[float, Any]:
    """(seconds per step, energy meter) of `steps` back-to-back steps, synchronised at both
    ends; the meter's window encloses the timed one, so its energy is that of these steps."""
    import jax

    from effjax.bench import energy
    from effjax.parallel import sharding as shd
    with jax.set_mesh(self.mesh), shd.axis_rules(self.rules):
      jax.block_until_ready(self.state)
      with energy.Meter() as meter:
        t0 = time.perf_counter()
        for _ in range(steps):
          self.state, metrics = self.compiled(self.state, self.next_batch())
        jax.block_until_ready((self.state, metrics))
        seconds = (time.perf_counter() - t0) / steps
    self.last_loss = float(metrics['loss'])
    return seconds, meter


def _prepare(config, batches: str, warmup_steps: int) -> _Prepared:
  """Validate, build, compile and warm up one config's train step (raises on a bad config)."""
  import jax

  from effjax import config as config_lib
  from effjax import data as data_lib
  from effjax.optim.factory import make_optimizer
  from effjax.parallel import mesh as mesh_lib
  from effjax.parallel import sharding as shd
  from effjax.train import step as step_lib

  config_lib.validate(config)
  tc = config.train
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = shd.rules_from_config(config.sharding_rules)
  optimizer, schedule = make_optimizer(config.optim, max(tc.steps, 1))
  rows_per_host = tc.batch_size // jax.process_count()
  with jax.set_mesh(mesh), shd.axis_rules(rules):
    setup = step_lib.make_setup(config, optimizer, schedule, mesh)
    state = setup.init(config.seed)
    train_step = step_lib.make_train_step(setup, z_loss=tc.z_loss,
                                          loss_chunk_size=tc.loss_chunk_size,
                                          **step_lib.hessian_options(config))
    if batches == 'pipeline':
      iterator = data_lib.make_train_iterator(config, process_index=jax.process_index(),
                                              process_count=jax.process_count())
      next_batch = lambda: step_lib.device_batch(setup, next(iterator), tc.grad_accum_steps)
    else:
      rng = np.random.default_rng(config.seed)
      pool = [step_lib.device_batch(setup, _host_batch(config, batches, rng, rows_per_host),
                                    tc.grad_accum_steps) for _ in range(2)]
      counter = itertools.count()
      next_batch = lambda: pool[next(counter) % len(pool)]

    first = next_batch()
    t0 = time.perf_counter()
    compiled = train_step.lower(state, first).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    for _ in range(max(warmup_steps, 1)):
      state, metrics = compiled(state, next_batch())
    first_loss = float(metrics['loss'])
  return _Prepared(config, mesh, rules, state, compiled, next_batch, compile_s,
                   compiled.memory_analysis(), cost, rows_per_host, first_loss, batches)


def measure(config, *, batches: str = 'synthetic', warmup_steps: int = 3, steps: int = 10,
            repeats: int = 3, profile_dir: str = '') -> dict[str, Any]:
  """One config's steady-state training throughput; raises on bad config, returns a result row."""
  import jax

  from effjax.parallel import sharding as shd

  prepared = _prepare(config, batches, warmup_steps)
  windows, meters = zip(*(prepared.window(steps) for _ in range(repeats)))
  profile_summary = None
  if profile_dir:
    with jax.set_mesh(prepared.mesh), shd.axis_rules(prepared.rules):
      state = prepared.state
      jax.profiler.start_trace(profile_dir)
      for _ in range(3):
        state, metrics = prepared.compiled(state, prepared.next_batch())
      jax.block_until_ready((state, metrics))
      jax.profiler.stop_trace()
      prepared.state = state
    profile_summary = summarise_profile(profile_dir)
    with open(os.path.join(profile_dir, 'summary.txt'), 'w', encoding='utf-8') as f:
      f.write(profile_summary + '\n')
  return _row(prepared, list(windows), list(meters), steps, profile_summary)


def measure_alternating(configs: Sequence[tuple[str, Any]], *, batches: str = 'synthetic',
                        warmup_steps: int = 3, steps: int = 10, rounds: int = 5,
                        seed: int = 0) -> list[dict[str, Any]]:
  """Several configs' train steps built in one process and timed in alternation: `rounds`
  rounds, each one window of `steps` steps per config in a fresh random order, so a GPU whose
  clock drifts during the run slows every config alike. One row per (name, config), as measure()
  gives it (the median window), plus `speedup_vs_first`: the median over rounds of this
  config's tokens/s over the first config's in the same round (time per token, so variants
  with different batches compare by throughput), and `speedup_spread`, the rounds' 25th-75th
  percentiles of that ratio. Every config's state stays resident, so peak memory is the
  process's (the same figure on every row): read compiled_memory_gb per config instead. A
  config that fails to build or compile (out of memory, a kernel that does not lower) is a row
  with its error and takes no part in the rounds; if it is the first, no row gets a speedup.
  """
  from effjax.bench.kernels import first_line, ratio_stats, spread_text
  if not configs:
    raise ValueError('no configs to alternate')
  if rounds < 1:
    raise ValueError(f'need at least one round; got {rounds}')
  prepared, errors = {}, {}
  for i, (name, config) in enumerate(configs):
    try:
      prepared[i] = _prepare(config, batches, warmup_steps)
    except Exception as e:  # pylint: disable=broad-except
      errors[i] = 'out of memory' if is_oom(e) else first_line(e)
  timed = {i: ([], []) for i in prepared}
  rng = np.random.default_rng(seed)
  for _ in range(rounds):
    for i in rng.permutation(sorted(prepared)):
      seconds, meter = prepared[i].window(steps)
      timed[i][0].append(seconds)
      timed[i][1].append(meter)
  per_token = {i: np.asarray(timed[i][0]) / (c.train.batch_size * c.data.seq_len)
               for i, (_, c) in enumerate(configs) if i in prepared}
  rows = []
  for i, (name, _) in enumerate(configs):
    if i in errors:
      rows.append({'name': name, 'error': errors[i]})
      continue
    row = {'name': name, **_row(prepared[i], timed[i][0], timed[i][1], steps, None),
           'rounds': rounds}
    if 0 in per_token:
      stats = ratio_stats(per_token[0] / per_token[i])
      row.update(speedup_vs_first=stats['ratio'], speedup_spread=spread_text(stats))
    rows.append(row)
  return rows


def _row(prepared: _Prepared, windows: list[float], meters: list, steps: int,
         profile_summary: str | None) -> dict[str, Any]:
  """measure()'s result row from a prepared config's timed windows (seconds per step)."""
  import jax

  from effjax.bench import energy
  from effjax.models.lm import count_params
  from effjax.train import flops as flops_lib
  from effjax.train.metrics import device_memory

  config, memory, cost = prepared.config, prepared.memory, prepared.cost
  tc = config.train
  step_time = statistics.median(windows)
  tokens_per_step = tc.batch_size * config.data.seq_len
  tokens_timed = prepared.rows_per_host * config.data.seq_len * steps * len(windows)
  flops_per_token = flops_lib.train_flops_per_token(config.model, config.data.seq_len)
  peak = flops_lib.peak_flops_per_device(override_tflops=tc.peak_tflops)
  mfu = flops_lib.mfu(tokens_per_step / step_time, flops_per_token, jax.device_count(), peak)
  mem = device_memory()
  compiled_bytes, breakdown = None, None
  if memory is not None:
    compiled_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes +
                      memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    # Where the compiled step's memory goes: its arguments (state and batch), outputs, XLA's
    # temporaries (activations, gradients before they are applied, loss chunks) and the
    # outputs that reuse an argument's buffer (donated state).
    breakdown = {name: getattr(memory, f'{name}_size_in_bytes') / 1e9
                 for name in ('argument', 'output', 'temp', 'alias')}
  xla_flops = cost.get('flops') if cost else None
  return {
      'params_m': count_params(config.model) / 1e6,
      'params_non_embedding_m': count_params(config.model, include_embedding=False) / 1e6,
      'params_active_non_embedding_m': count_params(config.model, include_embedding=False,
                                                    active=True) / 1e6,
      'batch_size': tc.batch_size, 'seq_len': config.data.seq_len,
      'grad_accum_steps': tc.grad_accum_steps, 'tokens_per_step': tokens_per_step,
      'batches': prepared.batches, 'mesh': dict(prepared.mesh.shape),
      'compile_s': prepared.compile_s,
      'step_time_ms': 1e3 * step_time,
      'step_time_windows_ms': [1e3 * w for w in windows],
      'step_time_spread_pct': 100 * (max(windows) - min(windows)) / step_time,
      'tokens_per_second': tokens_per_step / step_time,
      'tokens_per_second_per_device': tokens_per_step / step_time / jax.device_count(),
      'flops_per_token': flops_per_token,
      'peak_flops_per_device': peak,
      'mfu': mfu, 'mfu_percent': None if mfu is None else 100 * mfu,
      # Energy of this process's devices over all timed windows, over this process's tokens.
      'tokens_timed': tokens_timed,
      **energy.row_fields(meters, tokens_timed),
      # XLA's own count of the compiled step (includes rematerialisation and the optimizer).
      'xla_flops_per_step_per_device': xla_flops,
      'peak_memory_gb': mem.get('memory_peak_gb'),
      'host_peak_rss_gb': mem.get('host_peak_rss_gb'),
      'compiled_memory_gb': None if compiled_bytes is None else compiled_bytes / 1e9,
      'compiled_memory_breakdown_gb': breakdown,
      'loss_first': prepared.first_loss, 'loss_last': prepared.last_loss,
      'profile_summary': profile_summary,
      'config': config.to_dict(),
  }


def is_oom(error: BaseException) -> bool:
  text = str(error)
  return 'RESOURCE_EXHAUSTED' in text or 'Out of memory' in text or 'out of memory' in text


def run_one(config, variant: dict[str, str], **kwargs) -> dict[str, Any]:
  """measure(), with failures a device can produce (out of memory) recorded in the row."""
  row: dict[str, Any] = {'name': variant_name(variant), 'overrides': variant}
  try:
    row.update(measure(config, **kwargs))
  except Exception as e:  # pylint: disable=broad-except
    if not is_oom(e):
      raise
    row['error'] = 'out of memory'
    row['error_detail'] = ' '.join(str(e).split())[:500]
  return row


def _run_child(argv: list[str], env: dict[str, str], keep: int = 15) -> tuple[int, str]:
  """Run a sweep child, its stderr passed through as it comes; (exit status, last `keep` lines
  of that stderr) so a failed variant's row says why."""
  tail: collections.deque[str] = collections.deque(maxlen=keep)
  with subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True, errors='replace') as proc:
    for line in proc.stderr:
      sys.stderr.write(line)
      tail.append(line.rstrip())
    returncode = proc.wait()
  return returncode, '\n'.join(tail)


def run_sweep(variants: list[dict[str, str]], child_argv: list[str]) -> tuple[dict, list[dict]]:
  """Each variant in its own process; returns (environment of the first, rows)."""
  env_record, rows = None, []
  for variant in variants:
    env = dict(os.environ)
    overrides = []
    for key, value in variant.items():
      if key == 'xla_flags':
        env['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + value).strip()
      else:
        overrides.append(f'--config.{key}={value}')
    with tempfile.TemporaryDirectory() as tmp:
      row_file = os.path.join(tmp, 'row.json')
      argv = [sys.executable, '-m', 'effjax.bench', 'train', *child_argv, *overrides,
              f'--row_file={row_file}', f'--variant={json.dumps(variant)}']
      print(f'[bench] {variant_name(variant)}', flush=True)
      returncode, tail = _run_child(argv, env)
      if returncode or not os.path.exists(row_file):
        rows.append({'name': variant_name(variant), 'overrides': variant,
                     'error': f'exit status {returncode}', 'error_detail': tail})
        continue
      with open(row_file, encoding='utf-8') as f:
        record = json.load(f)
    env_record = env_record or record['environment']
    record['row']['xla_flags'] = env.get('XLA_FLAGS', '')
    rows.append(record['row'])
  return env_record, rows
