"""Kernel microbenchmarks: one op's implementations side by side over a grid of shapes.

    python -m effjax.bench kernels --op=attention [--grid=default|tiny]
        [--impls=effjax,effjax_triton,effjax_mosaic_gpu,tokamax,xla,cudnn]
        [--repeats=20] [--out=bench_results] [--name=kernels_attention]

One run measures, on the same device and in the same process, a bf16 8192^3 matmul (256^3 on
the tiny grid; the achievable 'matmul peak', which every row is also reported as a fraction of)
and then every case the op lists for the grid. A case is one jitted function of device-resident
inputs:

  timing   jit once (the compile time is recorded; with the persistent compilation cache on, a
           rerun's compile is mostly a cache read), one warm-up call per input set, then the
           median of `repeats` calls, each synchronised with block_until_ready and rotating over
           3 input sets so no call reuses the previous call's operands;
  failure  a case that fails (out of memory, as XLA's attention does once its S x S scores
           outgrow the device; a lowering error) records the first line of the error and the
           run goes on, as in the training bench; a case that cannot run on this
           device (cuDNN without a GPU) is recorded as skipped with the reason;
  ratios   `speedup_vs_baseline` is the baseline's time over the row's time for the same shape,
           mode and variant (>1: faster than the baseline); rows of a restricted variant (a
           sliding window, a block-sparse layout) also get `speedup_vs_dense`, against the same
           implementation's dense causal row, and `speedup_vs_baseline_dense`, against the
           baseline's dense causal row: the speedup that variant is for.

Attention (--op=attention; `attention_cases`): B*S tokens and H*D model width fixed while S
(1k-32k; batch at least 1) and D vary, causal or not, forward ('fwd') and forward + backward
('fwd+bwd': the q, k, v gradients of sum(out * cotangent) for a random cotangent, so no matmul
can be simplified away), bf16. Implementations: 'effjax' (kernels.flash_attention, backend
'auto'), 'effjax_triton' and 'effjax_mosaic_gpu' (the op with that GPU backend named), 'tokamax'
(tokamax.dot_product_attention(implementation='mosaic'), Google's Pallas Mosaic GPU kernels: an
optional peer, skipped where not installed), 'xla' and 'cudnn' (jax.nn.dot_product_attention).
At S = 16k (the grid's restricted_seq_len) causal rows also get a sliding window of 1024 (effjax,
tokamax and cuDNN's local window) and a BigBird layout at about 10% of the causal tiles (effjax
only: the others have no block-sparse kernel). Before timing, every implementation but XLA is
checked against the float32 reference on random shapes and masks (effjax/bench/attention_check.py;
rows with mode 'check'); one that fails has its timed rows skipped. TFLOP/s use the standard count
of useful work, 4*B*S^2*H*D forward, causal at half, fwd+bwd 3.5x forward; window and sparse rows
count exactly their allowed (query, key) pairs. effjax rows also carry `computed_flops`, the
FLOPs of the tiles the kernel visits (flash_attention.attention_flops; all S x S scores for the
'reference' backend that 'auto' picks off GPU and TPU). The tiny grid runs the same path on CPU
in seconds, for tests.

Grouped matmul (--op=gmm): effjax's grouped matmul vs jax.lax.ragged_dot vs a dense batched
einsum of the same FLOPs, for MoE expert shapes (effjax/bench/kernels_gmm.py).

Weight-only quantized matmul (--op=qmm): int8 / int4 weights through effjax's Triton kernel and
through XLA's dequantize-and-matmul against the bf16 matmul, at decode sizes (M = 1 to 16 rows),
in ms and GB/s of weight bytes read (effjax/bench/kernels_qmm.py).

Decode attention (--op=decode_attention): a decoding step's attention over a bf16 cache through
effjax's Triton kernel, XLA and cuDNN, batch 1 and 16, caches of 1k and 8k, one new token or a
verification pass of five (effjax/bench/kernels_decode.py).

Chunked scan (--op=scan): GLA / SSD shapes through effjax's chunked-scan op (kernel, plain-JAX
steps, reference) against cuDNN causal attention of the same heads, S 1k-32k, in tokens/s
(effjax/bench/kernels_scan.py).

Adding an op: write a function (grid, impls) -> iterator of `Case` and `register` an `Op` for it
(in a module of its own, imported at the end of this one).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import statistics
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from effjax.bench.train import is_oom

GRIDS = ('default', 'tiny')
MODES = ('fwd', 'fwd+bwd')
INPUT_SETS = 3
MATMUL_SIZE = {'default': 8192, 'tiny': 256}
FWD_BWD_FACTOR = 3.5  # backward = 5 matmuls to the forward's 2

COLUMNS_BEFORE_RATIOS = (
    ('group', 'shape', ''),
    ('variant', 'variant', ''),
    ('impl', 'impl', ''),
    ('mode', 'mode', ''),
    ('ms', 'time (ms)', '.3f'),
    ('tflops', 'TFLOP/s', '.1f'),
    ('mtokens_per_s', 'Mtokens/s', '.2f'),
    ('gb_per_s', 'GB/s read', '.0f'),
    ('peak_percent', '% matmul peak', '.1f'),
)
COLUMNS_AFTER_RATIOS = (
    ('block_sparsity_pct', 'block sparsity (%)', '.1f'),
    ('computed_tflops', 'computed TFLOP/s', '.1f'),
    ('profile_ms', 'traced device ms', '.3f'),
    ('device_gb_per_s', 'traced GB/s read', '.0f'),
    ('rel_err', 'rel. error', '.1e'),
    ('check', 'check', ''),
    ('compile_s', 'compile (s)', '.1f'),
    ('skipped', 'skipped', ''),
    ('error', 'error', ''),
)


@dataclasses.dataclass
class Case:
  """One row: `make()` returns (function, input sets); the other fields describe the row."""
  group: str  # the shape; rows of one group and mode are compared with each other
  variant: str  # 'dense', or the restriction ('window=1024', 'bigbird ...')
  impl: str
  mode: str
  useful_flops: float
  make: Callable[[], tuple[Callable[..., Any], list[tuple[jax.Array, ...]]]]
  info: dict[str, Any] = dataclasses.field(default_factory=dict)  # recorded verbatim in the row
  skip: str | None = None  # why this case cannot run here
  # (function, input sets) -> fields for the row (e.g. the error against a reference), run once
  # before timing; an exception fails the row like any other.
  check: Callable[[Callable[..., Any], list], dict[str, Any]] | None = None
  # How many times one call of the function computes the row's product (on different operands):
  # a product of a few microseconds is timed over a call long enough to hide the dispatch, with
  # operands too large together for the caches. ms, TFLOP/s, GB/s and profile_ms are then per
  # product (ms_calls stays per call).
  products: int = 1


@dataclasses.dataclass(frozen=True)
class Op:
  name: str
  impls: tuple[str, ...]
  baseline: str  # the implementation every row is compared with
  cases: Callable[[str, Sequence[str]], Iterator[Case]]  # (grid, impls) -> the cases to run
  # The unrestricted variant other variants are compared with; None: variants are not
  # restrictions of each other (no 'vs dense' ratios).
  dense_variant: str | None = 'dense'
  grids: tuple[str, ...] = GRIDS  # the --grid values this op has
  # (grid, impls) -> correctness rows (mode 'check', field 'check' = 'ok' or why not), run
  # before anything is timed; an implementation with a failing row has its timed rows skipped.
  precheck: Callable[[str, Sequence[str]], list[dict[str, Any]]] | None = None


OPS: dict[str, Op] = {}


def register(op: Op) -> Op:
  OPS[op.name] = op
  return op


def get_op(name: str) -> Op:
  if name not in OPS:
    raise ValueError(f'--op={name!r} is not a benchmarked op; allowed: {", ".join(OPS)}')
  return OPS[name]


def select_impls(op: Op, requested: Sequence[str]) -> tuple[str, ...]:
  """--impls (empty: all of the op's), in the op's order; unknown names are one clear error."""
  unknown = [name for name in requested if name not in op.impls]
  if unknown:
    raise ValueError(f'--impls={",".join(requested)} names {", ".join(unknown)}, not an '
                     f'implementation of {op.name}; allowed: {", ".join(op.impls)}')
  return tuple(name for name in op.impls if not requested or name in requested)


def columns(op: Op) -> tuple[tuple[str, str, str], ...]:
  """(row key, header, float format) for results.markdown."""
  dense = op.dense_variant
  ratios = (('speedup_vs_baseline', f'vs {op.baseline} (x)', '.2f'),)
  if dense is not None:
    ratios += (('speedup_vs_dense', f'vs {dense} (x)', '.2f'),
               ('speedup_vs_baseline_dense', f'vs {op.baseline} {dense} (x)', '.2f'))
  return COLUMNS_BEFORE_RATIOS + ratios + COLUMNS_AFTER_RATIOS


# ----------------------------------------------------------------------------------------------
# Timing


def first_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return f'{type(error).__name__}: {lines[0] if lines else ""}'[:300]


def time_calls(fn: Callable[..., Any], input_sets: Sequence[tuple[jax.Array, ...]],
               repeats: int) -> tuple[float, list[float]]:
  """(compile seconds, per-call seconds): one compile, a warm-up per input set, synced calls."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*input_sets[0]).compile()
  compile_s = time.perf_counter() - t0
  for args in input_sets:
    jax.block_until_ready(compiled(*args))
  seconds = []
  for i in range(repeats):
    args = input_sets[i % len(input_sets)]
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    seconds.append(time.perf_counter() - t0)
  return compile_s, seconds


def time_interleaved(compiled: dict[str, Callable[..., Any]],
                     input_sets: Sequence[tuple[Any, ...]] | Callable[[str], tuple[Any, ...]],
                     rounds: int, baseline: str, seed: int = 0) -> dict[str, dict[str, Any]]:
  """Compiled functions timed in alternation: `rounds` rounds, each calling every function once
  per input set (synced calls, in a fresh random order per round), so a clock that drifts
  during the run (a shared or throttling GPU) touches every function alike. `input_sets` is a
  list of argument tuples shared by all, or a function name -> a fresh argument tuple for one
  call (for donated arguments: made and synced outside the timed window; one call a round).
  Per function: `ms`, the median over rounds of its round's median call; `ratio`, the median
  over rounds of baseline's round time / its own (>1: faster than the baseline) with `ratio_lo`
  / `ratio_hi`, the rounds' 25th and 75th percentiles of that ratio; `rounds_ms`, its round
  times (for ratios between any two: `paired_ratio`). Each is warmed up first (every set once).
  """
  if baseline not in compiled:
    raise ValueError(f'baseline {baseline!r} is not one of the timed functions: '
                     f'{", ".join(compiled)}')
  if callable(input_sets):
    sets_of = lambda name: [input_sets]
  else:
    sets_of = lambda name: [lambda args=args: args for args in input_sets]
  if rounds < 1 or not sets_of(baseline):
    raise ValueError(f'need at least one round and one input set; got rounds={rounds} and '
                     f'{len(sets_of(baseline))} input sets')

  def call(name, make):
    args = make(name) if callable(input_sets) else make()
    jax.block_until_ready(args)
    t0 = time.perf_counter()
    jax.block_until_ready(compiled[name](*args))
    return time.perf_counter() - t0

  names = list(compiled)
  for name in names:
    for make in sets_of(name):
      call(name, make)
  rng = np.random.default_rng(seed)
  per_round = {name: [] for name in names}
  for _ in range(rounds):
    for i in rng.permutation(len(names)):
      per_round[names[i]].append(float(np.median(
          [call(names[i], make) for make in sets_of(names[i])])))
  base = np.asarray(per_round[baseline])
  return {name: dict(ms=float(np.median(per_round[name])) * 1e3,
                     **ratio_stats(base / np.asarray(per_round[name])),
                     rounds_ms=[t * 1e3 for t in per_round[name]])
          for name in names}


def ratio_stats(ratios) -> dict[str, float]:
  """Per-round ratios -> `ratio` (their median), `ratio_lo` / `ratio_hi` (25th / 75th
  percentiles)."""
  return dict(ratio=float(np.median(ratios)), ratio_lo=float(np.percentile(ratios, 25)),
              ratio_hi=float(np.percentile(ratios, 75)))


def spread_text(stats: dict[str, float]) -> str:
  """ratio_stats' quartiles as a result-table cell, 'lo-hi'."""
  return f'{stats["ratio_lo"]:.3f}-{stats["ratio_hi"]:.3f}'


def paired_ratio(timed: dict[str, dict[str, Any]], name: str, other: str) -> float:
  """Median over time_interleaved's rounds of other's round time / name's (>1: name faster)."""
  return float(np.median(np.asarray(timed[other]['rounds_ms']) /
                         np.asarray(timed[name]['rounds_ms'])))


PROFILE_CALLS = 3
PROFILE_TOP = 8


def _kernel_line(times: dict) -> tuple[str, str] | None:
  """The trace line whose events are the GPU's kernels (a 'Stream' line), else XLA's op line,
  else the busiest: the 'XLA Modules' line holds one event per call and says nothing per op."""
  def busy(key):
    return sum(ns for ns, _ in times[key].values())
  keys = [key for key in times if key[1] != 'XLA Modules'] or list(times)
  if not keys:
    return None
  streams = [key for key in keys if key[1].startswith('Stream')]
  ops = [key for key in keys if key[1] == 'XLA Ops']
  return max(streams or ops or keys, key=busy)


def profile_calls(fn: Callable[..., Any], input_sets: Sequence[tuple[jax.Array, ...]],
                  trace_dir: str, calls: int = PROFILE_CALLS) -> dict[str, Any]:
  """Traces `calls` synchronised calls of jit(fn) with jax.profiler into trace_dir: where one
  call's device time goes, as row fields. `profile_ms` is the device-busy time per call on the
  kernel line (what the wall-clock `ms` minus it leaves is launch and host overhead);
  `profile_top` lists the biggest kernels (or ops) with their time per call and share."""
  from effjax.bench.train import device_op_times, summarise_profile
  jitted = jax.jit(fn)
  jax.block_until_ready(jitted(*input_sets[0]))
  jax.profiler.start_trace(trace_dir)
  try:
    for i in range(calls):
      jax.block_until_ready(jitted(*input_sets[i % len(input_sets)]))
  finally:
    jax.profiler.stop_trace()
  times = device_op_times(trace_dir)
  line = _kernel_line(times)
  if line is None:
    return {'profile_error': f'no device events in the trace under {trace_dir}'}
  totals = times[line]
  busy = sum(ns for ns, _ in totals.values())
  top = sorted(totals.items(), key=lambda kv: -kv[1][0])[:PROFILE_TOP]
  with open(f'{trace_dir}/summary.txt', 'w', encoding='utf-8') as f:
    f.write(summarise_profile(trace_dir) + '\n')
  return {'profile_line': f'{line[0]} / {line[1]}', 'profile_ms': busy / calls / 1e6,
          'profile_top': [{'name': name[:160], 'ms': ns / calls / 1e6,
                           'percent': 100 * ns / max(busy, 1), 'per_call': count / calls}
                          for name, (ns, count) in top]}


def measure(op_name: str, case: Case, repeats: int, profile_dir: str = '') -> dict[str, Any]:
  """Runs one case into a result row; failures end up in the row, never raised. With
  profile_dir, the timed case is then traced (profile_calls) into a folder of its own there."""
  row: dict[str, Any] = {'op': op_name, 'group': case.group, 'variant': case.variant,
                         'impl': case.impl, 'mode': case.mode, **case.info,
                         'useful_flops': case.useful_flops}
  if case.skip:
    row['skipped'] = case.skip
    return row
  try:
    fn, input_sets = case.make()
    if case.check is not None:
      row.update(case.check(fn, input_sets))
    compile_s, seconds = time_calls(fn, input_sets, repeats)
  except Exception as e:  # pylint: disable=broad-except
    row['error'] = first_line(e)
    row['out_of_memory'] = is_oom(e)
    return row
  ms = 1e3 * statistics.median(seconds) / case.products
  row.update(compile_s=compile_s, ms=ms, ms_calls=[1e3 * s for s in seconds],
             tflops=case.useful_flops / ms / 1e9)
  if case.products > 1:
    row['products_per_call'] = case.products
  if profile_dir:
    try:
      row.update(profile_calls(fn, input_sets, profile_dir))
      if 'profile_ms' in row:
        row['profile_ms'] /= case.products
    except Exception as e:  # pylint: disable=broad-except  (a profiler problem loses no timing)
      row['profile_error'] = first_line(e)
  if row.get('tokens'):
    row['mtokens_per_s'] = row['tokens'] / ms / 1e3
  if row.get('bytes'):  # bytes a product must read (a weight-bound kernel's figure of merit)
    row['gb_per_s'] = row['bytes'] / ms / 1e6
    if row.get('profile_ms'):
      row['device_gb_per_s'] = row['bytes'] / row['profile_ms'] / 1e6
  if row.get('computed_flops'):
    row['computed_tflops'] = row['computed_flops'] / ms / 1e9
  return row


def matmul_case(n: int) -> Case:
  """The achievable bf16 matmul rate on this device: the reference for every kernel row."""
  def make():
    keys = jax.random.split(_fresh_key(), 2 * INPUT_SETS)
    mats = [jax.random.normal(key, (n, n), jnp.bfloat16) for key in keys]
    return jnp.matmul, [tuple(mats[2 * i:2 * i + 2]) for i in range(INPUT_SETS)]
  return Case(group=f'{n}x{n}x{n} bf16', variant='dense', impl='xla', mode='fwd',
              useful_flops=2.0 * n ** 3, make=make, info={'m': n, 'n': n, 'k': n})


def add_ratios(rows: list[dict[str, Any]], baseline: str, dense: str | None = 'dense') -> None:
  """Speedups against the baseline and against `dense`-variant rows of the same group and mode."""
  timed = {(r['group'], r['mode'], r['variant'], r['impl']): r['ms'] for r in rows if r.get('ms')}

  def speedup(row, variant, impl):
    other = timed.get((row['group'], row['mode'], variant, impl))
    return None if other is None else other / row['ms']

  for row in rows:
    if not row.get('ms'):
      continue
    row['speedup_vs_baseline'] = speedup(row, row['variant'], baseline)
    if dense is not None and row['variant'] != dense:
      row['speedup_vs_dense'] = speedup(row, dense, row['impl'])
      row['speedup_vs_baseline_dense'] = speedup(row, dense, baseline)


def _case_dir(profile_dir: str, index: int, case: Case) -> str:
  name = f'{index:03d}_{case.group}_{case.variant}_{case.impl}_{case.mode}'
  return os.path.join(profile_dir, re.sub(r'[^A-Za-z0-9_.=+-]+', '_', name))


def run(op: Op, *, grid: str, impls: Sequence[str], repeats: int,
        log: Callable[[str], None] = print, profile_dir: str = '') -> list[dict[str, Any]]:
  """The matmul peak, then every case of `op` on `grid`: the result rows, ratios filled in.
  With profile_dir every case is also traced (`profile_calls`), each into a subfolder."""
  cases = [('matmul', matmul_case(MATMUL_SIZE.get(grid, MATMUL_SIZE['default'])))]
  checks = op.precheck(grid, impls) if op.precheck else []
  for row in checks:
    if log is print:
      log(f'[check] {_describe(row)}')
    else:
      log(f'[check] {_describe(row)}', row)
  failed = sorted({row['impl'] for row in checks if row.get('check', 'ok') != 'ok'})
  for case in op.cases(grid, impls):
    if case.impl in failed and not case.skip:
      case.skip = ('failed the correctness check against the reference before timing (the '
                   "rows with mode 'check')")
    cases.append((op.name, case))
  rows = []
  for index, (op_name, case) in enumerate(cases):
    trace = _case_dir(profile_dir, index, case) if profile_dir else ''
    rows.append(measure(op_name, case, repeats, trace))
    if log is print:
      log(f'[bench] {_describe(rows[-1])}')
    else:
      log(f'[bench] {_describe(rows[-1])}', rows[-1])
  peak = rows[0].get('tflops')
  for row in rows:
    if peak and row.get('tflops'):
      row['peak_fraction'] = row['tflops'] / peak
      row['peak_percent'] = 100 * row['peak_fraction']
  add_ratios(rows, op.baseline, op.dense_variant)
  return rows[:1] + checks + rows[1:]


def _describe(row: dict[str, Any]) -> str:
  what = f'{row["group"]} {row["variant"]} {row["impl"]} {row["mode"]}:'
  if row.get('skipped'):
    return f'{what} skipped ({row["skipped"]})'
  if row.get('error'):
    return f'{what} failed ({row["error"]})'
  if row['mode'] == 'check':
    errs = ' '.join(f'{k} {v:.1e}' for k, v in row.get('rel_errs', {}).items())
    return f'{what} {row["check"]} (relative error {errs})'
  flag = f' [{row["check"]}]' if row.get('check') else ''
  text = f'{what} {row["ms"]:.3f} ms, {row["tflops"]:.1f} TFLOP/s{flag}'
  if row.get('profile_top'):
    top = '; '.join(f'{t["name"][:48]} {t["ms"]:.3f} ms {t["percent"]:.0f}%'
                    for t in row['profile_top'][:4])
    per = 'product' if row.get('products_per_call') else 'call'
    text += f'\n    device {row["profile_ms"]:.3f} ms/{per}: {top}'
  return text


def _cell(row: dict[str, Any]) -> str:
  if row.get('skipped'):
    return 'skip'
  if row.get('error'):
    return 'OOM' if row.get('out_of_memory') else 'error'
  if row.get('mtokens_per_s'):
    return f'{row["ms"]:.3f} ms {row["mtokens_per_s"]:.3g} Mtok/s'
  if row.get('gb_per_s'):
    return f'{row["ms"]:.4f} ms {row["gb_per_s"]:.0f} GB/s'
  return f'{row["ms"]:.3f} ms {row["tflops"]:.3g} TF/s'


def summary(rows: Sequence[dict[str, Any]], op: Op) -> str:
  """A compact table: one line per (shape, variant, mode), one column per implementation."""
  peak, rows = rows[0], rows[1:]
  checks = [row for row in rows if row['mode'] == 'check']
  rows = [row for row in rows if row['mode'] != 'check']
  impls = list(dict.fromkeys(row['impl'] for row in rows))
  lines: dict[tuple[str, str, str], dict[str, str]] = {}
  for row in rows:
    entry = lines.setdefault((row['group'], row['variant'], row['mode']), {})
    entry[row['impl']] = _cell(row)
    if row.get('speedup_vs_baseline') and row['impl'] != op.baseline:
      entry[f'{row["impl"]} vs {op.baseline}'] = f'{row["speedup_vs_baseline"]:.2f}x'
    if row.get('speedup_vs_dense'):
      entry[f'{row["impl"]} vs {op.dense_variant}'] = f'{row["speedup_vs_dense"]:.2f}x'
  ratios = dict.fromkeys(k for entry in lines.values() for k in entry if k not in impls)
  table = [['shape', 'variant', 'mode', *impls, *ratios]]
  table += [[group, variant, mode, *(entry.get(h, '-') for h in (*impls, *ratios))]
            for (group, variant, mode), entry in lines.items()]
  widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
  text = ['  '.join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table]
  head = [f'matmul peak ({peak["group"]}): {_cell(peak)}']
  for impl in dict.fromkeys(row['impl'] for row in checks):
    mine = [row for row in checks if row['impl'] == impl]
    if all(row.get('skipped') for row in mine):
      head.append(f'correctness {impl}: not run ({mine[0]["skipped"]})')
      continue
    ok = sum(row.get('check') == 'ok' for row in mine)
    worst = max((row.get('rel_err', float('inf')) for row in mine), default=float('nan'))
    head.append(f'correctness {impl}: {ok}/{len(mine)} random cases ok, worst relative '
                f'error {worst:.1e}')
  return '\n'.join(head + text)


def import_tokamax():
  """tokamax, imported for its kernels alone. Its package __init__ imports its own benchmarking
  helpers, which import xprof (a profiler UI, not on the GPU machine) at the top: when that is all
  that is missing, an empty stand-in for xprof.cli.tools lets the kernels import; nothing here
  calls those helpers."""
  import importlib  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import types  # pylint: disable=import-outside-toplevel
  try:
    return importlib.import_module('tokamax')
  except ModuleNotFoundError as e:
    if not (e.name or '').startswith('xprof'):
      raise
  for name in ('xprof', 'xprof.cli', 'xprof.cli.tools'):
    sys.modules.setdefault(name, types.ModuleType(name))
  sys.modules['xprof.cli.tools'].get_kernel_stats_tool = None
  return importlib.import_module('tokamax')


def tokamax_missing() -> str | None:
  """Why tokamax (an optional peer) cannot be imported here; None when it can."""
  try:
    import_tokamax()
  except Exception as e:  # pylint: disable=broad-except  (ImportError, or its own deps failing)
    return f'tokamax is not importable here ({first_line(e)})'
  return None


def _fresh_key() -> jax.Array:
  return jax.random.key(int(np.random.default_rng().integers(2 ** 31)))


# ----------------------------------------------------------------------------------------------
# Attention


@dataclasses.dataclass(frozen=True)
class AttentionGrid:
  tokens: int  # B * S
  width: int  # H * D
  seq_lens: tuple[int, ...]
  head_dims: tuple[int, ...]
  window: int  # the sliding-window rows' w
  layout_block: int  # the sparse rows' BigBird block
  restricted_seq_len: int  # the S of the window and block-sparse rows (and their dense rows)
  sparse_target: float = 0.10  # computed-tile fraction of the causal grid to aim for
  # Random correctness cases per effjax implementation before timing (one per mask kind; the
  # peers get one per mask they support). Each case compiles the op and the reference with
  # gradients, about 5-25 s on a GPU, so the check stays small.
  check_cases: int = 6
  check_seq_lens: tuple[int, ...] = (256, 512)
  check_head_dims: tuple[int, ...] = (64, 128, 256)
  causal: tuple[bool, ...] = (True, False)  # the dense rows' masks


ATTENTION_GRIDS = {
    'default': AttentionGrid(tokens=16384, width=2048,
                             seq_lens=(1024, 2048, 4096, 8192, 16384, 32768),
                             head_dims=(64, 128), window=1024, layout_block=128,
                             restricted_seq_len=16384),
    # The shapes the Hopper targets are stated at, causal only: one GPU call's worth.
    'targets': AttentionGrid(tokens=16384, width=2048, seq_lens=(1024, 4096, 16384, 32768),
                             head_dims=(64, 128), window=1024, layout_block=128,
                             restricted_seq_len=16384, causal=(True,)),
    # Two causal D-128 shapes plus the window and sparse rows: a few minutes, to see where a
    # kernel change moved speed before the full grids.
    'quick': AttentionGrid(tokens=16384, width=2048, seq_lens=(4096, 16384), head_dims=(128,),
                           window=1024, layout_block=128, restricted_seq_len=16384,
                           causal=(True,), check_cases=2, check_seq_lens=(256,),
                           check_head_dims=(128,)),
    'tiny': AttentionGrid(tokens=512, width=128, seq_lens=(128, 256), head_dims=(64,), window=64,
                          layout_block=32, restricted_seq_len=256, check_cases=3,
                          check_seq_lens=(128, 256), check_head_dims=(64,)),
}
# Implementations: effjax's op with backend 'auto' and with each GPU backend named, tokamax's
# Mosaic GPU attention (an optional peer), and jax.nn.dot_product_attention's XLA and cuDNN.
EFFJAX_BACKENDS = {'effjax': 'auto', 'effjax_triton': 'triton',
                   'effjax_mosaic_gpu': 'mosaic_gpu'}
ATTENTION_IMPLS = (*EFFJAX_BACKENDS, 'tokamax', 'xla', 'cudnn')
WINDOW_IMPLS = (*EFFJAX_BACKENDS, 'tokamax', 'cudnn')  # those with a sliding-window kernel


def dense_flops(batch: int, seq_len: int, heads: int, head_dim: int, *, causal: bool) -> float:
  """The standard forward count: 4*B*S^2*H*D (two matmuls), half of it when causal."""
  return 4.0 * batch * seq_len ** 2 * heads * head_dim * (0.5 if causal else 1.0)


def allowed_pairs(seq_len: int, *, window: int | None = None, layout=None) -> int:
  """Causal (query, key) pairs a window or a layout allows: the useful work of those rows."""
  if layout is not None:
    b = layout.block
    blocks = np.tril(layout.array())
    diagonal = int(np.trace(blocks))
    return (int(blocks.sum()) - diagonal) * b * b + diagonal * b * (b + 1) // 2
  w = min(window or seq_len, seq_len)
  return w * (w + 1) // 2 + (seq_len - w) * w  # query i sees min(i + 1, w) keys


def causal_tile_fraction(seq_len: int, block: int, *, window: int | None = None,
                         layout=None) -> float:
  """Share of the causal grid's [block x block] tiles that hold an allowed pair."""
  from effjax.kernels.flash_attention import computed_blocks
  n = seq_len // block
  tiles = computed_blocks(seq_len, block, block, causal=True, window=window, layout=layout)
  return float(tiles.sum()) / (n * (n + 1) / 2)


@functools.lru_cache(maxsize=4)
def sparse_layout(seq_len: int, block: int, target: float):
  """The BigBird layout (small local/global/random counts) nearest `target` causal-tile fraction."""
  from effjax.kernels.flash_attention import bigbird_layout
  best = None
  for local in range(3, 9):  # a real local band; ties go to the smallest counts
    for global_ in (1, 2):
      for random_ in range(1, 5):
        layout = bigbird_layout(seq_len, block, local_blocks=local, global_blocks=global_,
                                random_blocks=random_, seed=0, causal=True)
        gap = abs(causal_tile_fraction(seq_len, block, layout=layout) - target)
        if best is None or gap < best[0]:
          best = (gap, layout, {'local_blocks': local, 'global_blocks': global_,
                                'random_blocks': random_, 'seed': 0, 'block': block})
  return best[1], best[2]


@functools.lru_cache(maxsize=1)
def _attention_inputs(shape: tuple[int, ...]) -> list[tuple[jax.Array, ...]]:
  """INPUT_SETS sets of (q, k, v, cotangent) in bf16; only the latest shape is kept alive."""
  keys = jax.random.split(_fresh_key(), 4 * INPUT_SETS)
  arrays = [jax.random.normal(key, shape, jnp.bfloat16) for key in keys]
  return [tuple(arrays[4 * i:4 * i + 4]) for i in range(INPUT_SETS)]


def _with_mode(attend: Callable[..., jax.Array], mode: str) -> Callable[..., Any]:
  if mode == 'fwd':
    return lambda q, k, v, ct: attend(q, k, v)
  def fwd_bwd(q, k, v, ct):
    _, pullback = jax.vjp(attend, q, k, v)  # the gradients of sum(out * ct)
    return pullback(ct)
  return fwd_bwd


def _fitted(block: int, seq_len: int, layout) -> int:
  """flash_attention's own rule for a default block: halve until it divides S and the layout."""
  while block > 1 and (seq_len % block or (layout is not None and layout.block % block)):
    block //= 2
  return block


def _effjax_info(batch, seq_len, heads, head_dim, *, mode, causal, window, layout,
                 backend='auto'):
  """The backend run (what 'auto' picks here) and the FLOPs it spends on the tiles it visits."""
  from effjax.kernels import flash_attention as fa
  backend = fa.resolve_backend(backend, dtype=jnp.bfloat16, seq_len=seq_len,
                               layout_block=None if layout is None else layout.block)
  factor = FWD_BWD_FACTOR if mode == 'fwd+bwd' else 1.0
  if backend == 'reference':  # plain jnp: every score of the S x S grid is computed
    return {'backend': backend,
            'computed_flops': factor * dense_flops(batch, seq_len, heads, head_dim, causal=False)}
  block_q, block_k = (_fitted(b, seq_len, layout) for b in fa.default_blocks(backend, head_dim))
  flops = fa.attention_flops(batch, seq_len, heads, head_dim, block_q=block_q, block_k=block_k,
                             causal=causal, window=window, layout=layout)
  return {'backend': backend, 'block_q': block_q, 'block_k': block_k,
          'computed_flops': factor * flops}  # attention_flops(backward=True) is 2.5x forward


def _attention_case(impl: str, mode: str, *, batch: int, seq_len: int, heads: int,
                    head_dim: int, causal: bool, variant: str = 'dense',
                    window: int | None = None, layout=None,
                    layout_info: dict[str, int] | None = None,
                    sparsity_block: int | None = None) -> Case:
  """One attention row; window / layout rows are causal and count only their allowed pairs."""
  group = f'S={seq_len} B={batch} H={heads} D={head_dim} {"causal" if causal else "full"}'
  info: dict[str, Any] = {'batch': batch, 'seq_len': seq_len, 'num_heads': heads,
                          'head_dim': head_dim, 'causal': causal, 'window': window,
                          'layout': layout_info, 'dtype': 'bfloat16'}
  if variant == 'dense':
    flops = dense_flops(batch, seq_len, heads, head_dim, causal=causal)
  else:
    flops = 4.0 * batch * heads * head_dim * allowed_pairs(seq_len, window=window, layout=layout)
    fraction = causal_tile_fraction(seq_len, sparsity_block, window=window, layout=layout)
    info.update(sparsity_block=sparsity_block, block_sparsity_pct=100 * (1 - fraction))
  flops *= FWD_BWD_FACTOR if mode == 'fwd+bwd' else 1.0
  from effjax.bench import attention_check
  skip = attention_check.needs(impl)
  local = None if window is None else (window - 1, 0)  # the same mask as window=w, causal

  if impl in EFFJAX_BACKENDS:
    from effjax.kernels.flash_attention import flash_attention
    info.update(_effjax_info(batch, seq_len, heads, head_dim, mode=mode, causal=causal,
                             window=window, layout=layout, backend=EFFJAX_BACKENDS[impl]))
    attend = functools.partial(flash_attention, causal=causal, window=window, layout=layout,
                               backend=EFFJAX_BACKENDS[impl])
  elif impl == 'tokamax':
    info['implementation'] = 'mosaic'

    def attend(q, k, v):
      return import_tokamax().dot_product_attention(q, k, v, is_causal=causal,
                                                    local_window_size=local,
                                                    implementation='mosaic')
  else:
    attend = functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                               local_window_size=local, implementation=impl)
  make = lambda: (_with_mode(attend, mode), _attention_inputs((batch, seq_len, heads, head_dim)))
  return Case(group=group, variant=variant, impl=impl, mode=mode, useful_flops=flops, make=make,
              info=info, skip=skip)


def attention_cases(grid: str, impls: Sequence[str]) -> Iterator[Case]:
  """Every (S, D, causal, mode) for each impl; window and sparse rows beside the causal rows
  at the grid's restricted_seq_len."""
  g = ATTENTION_GRIDS[grid]
  for seq_len in g.seq_lens:
    for head_dim in g.head_dims:
      shape = dict(batch=max(1, g.tokens // seq_len), seq_len=seq_len,
                   heads=g.width // head_dim, head_dim=head_dim)
      for causal in g.causal:
        for mode in MODES:
          for impl in impls:
            yield _attention_case(impl, mode, causal=causal, **shape)
          if seq_len != g.restricted_seq_len or not causal:
            continue
          for impl in (i for i in impls if i in WINDOW_IMPLS):
            yield _attention_case(impl, mode, causal=True, variant=f'window={g.window}',
                                  window=g.window, sparsity_block=g.layout_block, **shape)
          layout, layout_info = sparse_layout(seq_len, g.layout_block, g.sparse_target)
          counts = '/'.join(str(layout_info[k]) for k in ('local_blocks', 'global_blocks',
                                                          'random_blocks'))
          # No other implementation has a block-sparse kernel.
          for impl in (i for i in impls if i in EFFJAX_BACKENDS):
            yield _attention_case(impl, mode, causal=True, variant=f'bigbird l/g/r={counts}',
                                  layout=layout, layout_info=layout_info,
                                  sparsity_block=g.layout_block, **shape)


def attention_precheck(grid: str, impls: Sequence[str]) -> list[dict[str, Any]]:
  """Each implementation but XLA against the float32 reference on random shapes and masks
  (attention_check), before anything is timed: rows with mode 'check'."""
  from effjax.bench import attention_check as ac
  g = ATTENTION_GRIDS[grid]
  rows = []
  for impl in (i for i in impls if i != 'xla'):
    base = {'op': 'attention', 'impl': impl, 'mode': 'check'}
    reason = ac.needs(impl)
    if reason:
      rows.append({**base, 'group': 'random cases', 'variant': '-', 'skipped': reason})
      continue
    peer = impl not in EFFJAX_BACKENDS
    seed = int(np.random.default_rng().integers(1 << 30))
    masks = ac.IMPL_MASKS.get(impl, ac.MASKS)
    cases = ac.random_cases(g.check_cases if not peer else len(masks), seq_lens=g.check_seq_lens,
                            head_dims=tuple(d for d in g.check_head_dims if d <= 128 or not peer),
                            masks=masks, seed=seed)
    for i, case in enumerate(cases):
      row = {**base, 'group': case.label, 'variant': case.mask, 'seed': seed + i,
             **dataclasses.asdict(case)}
      try:
        row.update(ac.check_case(impl, case, seed + i))
      except Exception as e:  # pylint: disable=broad-except  (a failure is a result)
        row.update(error=first_line(e), check='FAIL (error)')
      rows.append(row)
  return rows


register(Op(name='attention', impls=ATTENTION_IMPLS, baseline='cudnn', cases=attention_cases,
            precheck=attention_precheck, grids=tuple(ATTENTION_GRIDS)))

# Ops in modules of their own register on import.
from effjax.bench import kernels_gmm as _kernels_gmm  # noqa: E402,F401  pylint: disable=wrong-import-position
from effjax.bench import kernels_scan as _kernels_scan  # noqa: E402,F401  pylint: disable=wrong-import-position
from effjax.bench import kernels_qmm as _kernels_qmm  # noqa: E402,F401  pylint: disable=wrong-import-position
from effjax.bench import kernels_decode as _kernels_decode  # noqa: E402,F401  pylint: disable=wrong-import-position
