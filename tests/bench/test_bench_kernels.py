"""The kernel benchmark: the tiny grid end to end through the CLI, FLOPs accounting, errors."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from effjax.bench import kernels as kb
from effjax.bench import kernels_gmm as kbg
from effjax.bench import kernels_decode as kbd
from effjax.bench import kernels_qmm as kbq
from effjax.bench import kernels_scan as kbs
from effjax.kernels.flash_attention import bigbird_layout
from effjax.kernels.flash_attention.layout import token_mask

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _bench(*args, expect_rc=0):
  cmd = [sys.executable, '-m', 'effjax.bench', 'kernels', *args]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                        check=False)
  assert proc.returncode == expect_rc, proc.stderr[-3000:]
  return proc


def _expected_rows() -> set[tuple]:
  """(group, variant, impl, mode) of every attention row of the tiny grid, built independently."""
  rows = set()
  for s, b in ((128, 4), (256, 2)):
    for causal in ('causal', 'full'):
      group = f'S={s} B={b} H=2 D=64 {causal}'
      for mode in ('fwd', 'fwd+bwd'):
        rows |= {(group, 'dense', impl, mode) for impl in ALL_IMPLS}
        if s == 256 and causal == 'causal':
          rows |= {(group, 'window=64', impl, mode) for impl in ALL_IMPLS if impl != 'xla'}
          rows |= {(group, 'bigbird l/g/r=3/1/1', impl, mode) for impl in EFFJAX}
  return rows


EFFJAX = ('effjax', 'effjax_triton', 'effjax_mosaic_gpu')
ALL_IMPLS = (*EFFJAX, 'tokamax', 'xla', 'cudnn')


def test_tiny_grid_runs_end_to_end_on_cpu(tmp_path):
  proc = _bench('--grid=tiny', '--repeats=2', f'--out={tmp_path}', '--name=k',
                '--compilation_cache_dir=')
  record = json.loads((tmp_path / 'k.json').read_text())
  env, rows = record['environment'], record['rows']
  assert env['platform'] == 'cpu' and 'kernels' in env['command']
  peak, rows = rows[0], rows[1:]
  assert peak['op'] == 'matmul' and peak['m'] == 256 and peak['tflops'] > 0
  checks = [r for r in rows if r['mode'] == 'check']
  rows = [r for r in rows if r['mode'] != 'check']
  # Before timing: 3 random correctness cases for effjax ('auto': the reference backend on CPU),
  # one 'skipped' row for each implementation that needs a GPU, none for XLA.
  assert [r['impl'] for r in checks] == ['effjax'] * 3 + [i for i in ALL_IMPLS[1:] if i != 'xla']
  for r in checks[:3]:
    assert r['check'] == 'ok' and r['rel_err'] < 2e-2 and set(r['rel_errs']) == {
        'out', 'dq', 'dk', 'dv'}
    assert r['seq_len'] in (128, 256) and r['q_heads'] % r['kv_heads'] == 0
  assert all('needs a GPU' in r['skipped'] for r in checks[3:])
  assert {(r['group'], r['variant'], r['impl'], r['mode']) for r in rows} == _expected_rows()
  assert len(rows) == len(_expected_rows())

  by_key = {(r['group'], r['variant'], r['impl'], r['mode']): r for r in rows}
  for row in rows:
    if row['impl'] != 'effjax' and row['impl'] != 'xla':
      assert 'needs a GPU' in row['skipped'] and 'ms' not in row and 'error' not in row
      continue
    assert 'error' not in row, row['error']
    assert row['ms'] > 0 and len(row['ms_calls']) == 2 and row['compile_s'] > 0
    assert row['tflops'] == pytest.approx(row['useful_flops'] / row['ms'] / 1e9)
    assert row['peak_fraction'] == pytest.approx(row['tflops'] / peak['tflops'])
    assert row['speedup_vs_baseline'] is None  # the cuDNN baseline was skipped
    b, s, h, d = row['batch'], row['seq_len'], row['num_heads'], row['head_dim']
    factor = 3.5 if row['mode'] == 'fwd+bwd' else 1.0
    if row['variant'] == 'dense':
      half = 0.5 if row['causal'] else 1.0
      assert row['useful_flops'] == pytest.approx(4 * b * s * s * h * d * half * factor)
    else:
      dense = by_key[(row['group'], 'dense', row['impl'], row['mode'])]
      assert row['speedup_vs_dense'] == pytest.approx(dense['ms'] / row['ms'])
      assert 0 < row['block_sparsity_pct'] < 100
    if row['impl'] == 'effjax':  # the reference backend computes every score
      assert row['backend'] == 'reference'
      assert row['computed_flops'] == pytest.approx(4 * b * s * s * h * d * factor)
  sparse = by_key[('S=256 B=2 H=2 D=64 causal', 'bigbird l/g/r=3/1/1', 'effjax', 'fwd')]
  assert sparse['layout'] == {'local_blocks': 3, 'global_blocks': 1, 'random_blocks': 1,
                              'seed': 0, 'block': 32}

  markdown = (tmp_path / 'k.md').read_text()
  assert '| S=256 B=2 H=2 D=64 causal | window=64 | cudnn | fwd |' in markdown
  assert 'vs cudnn dense (x)' in markdown
  # Printed last: the file paths, the matmul peak, then one line per (shape, variant, mode).
  lines = proc.stdout.strip().splitlines()
  end = next(i for i, line in enumerate(lines) if line.startswith('wrote '))
  assert lines[end + 1].startswith('matmul peak (256x256x256 bf16): ')
  assert lines[end + 2].startswith('correctness effjax: 3/3 random cases ok')
  assert lines[end + 3].startswith('correctness effjax_triton: not run')
  table = end + 2 + 5  # five correctness lines: every implementation but XLA
  assert lines[table].split()[:9] == ['shape', 'variant', 'mode', *ALL_IMPLS]
  assert len(lines) == table + 1 + len({(g, v, m) for g, v, _, m in _expected_rows()})


@pytest.mark.parametrize('args, message', [
    (['--op=grouped_matmul'], ("--op='grouped_matmul' is not a benchmarked op; allowed: "
                               'attention, gmm, scan, qmm, decode_attention')),
    (['--impls=effjax,triton'], ('--impls=effjax,triton names triton, not an implementation of '
                                 'attention; allowed: effjax, effjax_triton, effjax_mosaic_gpu, '
                                 'tokamax, xla, cudnn')),
    (['--grid=huge'], ("--grid='huge' is not a grid of --op=attention; allowed: default, targets, "
                       'quick, tiny')),
])
def test_bad_requests_are_one_clear_error(args, message):
  proc = _bench(*args, expect_rc=2)
  assert proc.stderr.strip() == f'effjax.bench kernels: {message}'


def test_allowed_pairs_count_the_token_mask():
  rng = np.random.default_rng()
  seq_len, block = 256, 32
  window = int(rng.integers(1, seq_len + 1))
  assert kb.allowed_pairs(seq_len, window=window) == token_mask(seq_len, causal=True,
                                                                window=window).sum()
  layout = bigbird_layout(seq_len, block, local_blocks=int(rng.integers(1, 4)),
                          global_blocks=int(rng.integers(0, 3)),
                          random_blocks=int(rng.integers(0, 3)), seed=int(rng.integers(100)))
  assert kb.allowed_pairs(seq_len, layout=layout) == token_mask(seq_len, causal=True,
                                                                layout=layout).sum()


def test_sparse_layout_of_the_default_grid_is_about_ten_percent():
  grid = kb.ATTENTION_GRIDS['default']
  seq_len = grid.restricted_seq_len
  layout, info = kb.sparse_layout(seq_len, grid.layout_block, 0.10)
  fraction = kb.causal_tile_fraction(seq_len, grid.layout_block, layout=layout)
  assert 0.09 <= fraction <= 0.11 and layout.block == info['block'] == 128
  assert info['local_blocks'] >= 3 and info['global_blocks'] >= 1 and info['random_blocks'] >= 1


def test_ratios_compare_like_with_like():
  rng = np.random.default_rng()
  ms = {impl: rng.uniform(1, 10, size=3) for impl in ('effjax', 'cudnn')}
  rows = []
  for impl in ('effjax', 'cudnn'):
    for variant, t in zip(('dense', 'window=8', 'bigbird'), ms[impl]):
      rows.append({'group': 'g', 'mode': 'fwd', 'variant': variant, 'impl': impl, 'ms': t})
  rows.append({'group': 'g', 'mode': 'fwd+bwd', 'variant': 'dense', 'impl': 'effjax',
               'ms': 1.0})
  rows[5] = dict(rows[5], ms=None, error='OOM')  # cudnn has no bigbird row that ran
  kb.add_ratios(rows, 'cudnn')
  effjax_window, effjax_sparse = rows[1], rows[2]
  assert rows[0]['speedup_vs_baseline'] == pytest.approx(ms['cudnn'][0] / ms['effjax'][0])
  assert effjax_window['speedup_vs_baseline'] == pytest.approx(ms['cudnn'][1] / ms['effjax'][1])
  assert effjax_window['speedup_vs_dense'] == pytest.approx(ms['effjax'][0] / ms['effjax'][1])
  assert effjax_sparse['speedup_vs_baseline'] is None
  assert effjax_sparse['speedup_vs_baseline_dense'] == pytest.approx(ms['cudnn'][0] /
                                                                     ms['effjax'][2])
  assert rows[6]['speedup_vs_baseline'] is None  # no cudnn row in that mode
  assert 'speedup_vs_baseline' not in rows[5]


def test_interleaved_timing_cancels_a_drifting_clock():
  """Two functions whose every call gets slower as the run goes on (a throttling GPU): timed
  one after the other the later one would look slower than it is; interleaved, the per-round
  ratio is the true 2x."""
  import time
  calls = [0]

  def slow_by(factor):
    def fn(x):
      calls[0] += 1
      time.sleep(0.002 * factor * (1 + 0.05 * calls[0]))
      return x
    return fn

  sets = [(jax.numpy.asarray(np.random.default_rng().standard_normal(3)),) for _ in range(2)]
  got = kb.time_interleaved({'fast': slow_by(1), 'slow': slow_by(2)}, sets, rounds=8,
                            baseline='fast', seed=int(np.random.default_rng().integers(1 << 30)))
  assert got['fast']['ratio'] == 1.0
  assert got['slow']['ratio'] == pytest.approx(0.5, rel=0.15)
  assert got['slow']['ratio_lo'] <= got['slow']['ratio'] <= got['slow']['ratio_hi']
  assert got['slow']['ms'] > got['fast']['ms'] > 2.0
  assert kb.paired_ratio(got, 'fast', 'slow') == pytest.approx(2.0, rel=0.15)
  assert len(got['slow']['rounds_ms']) == 8
  with pytest.raises(ValueError, match="baseline 'cudnn' is not one of the timed functions"):
    kb.time_interleaved({'fast': slow_by(1)}, sets, rounds=1, baseline='cudnn')


def test_a_failing_case_is_recorded_not_raised():
  def make():
    x = np.random.default_rng().standard_normal((4, 3)).astype(np.float32)
    return (lambda a: a @ a), [(x,)] * 3  # [4, 3] @ [4, 3]: fails to trace
  case = kb.Case(group='g', variant='dense', impl='xla', mode='fwd', useful_flops=1.0, make=make)
  row = kb.measure('attention', case, repeats=2)
  assert row['error'].startswith('TypeError: ') and '\n' not in row['error']
  assert row['out_of_memory'] is False and 'ms' not in row


def test_gmm_tiny_grid_runs_end_to_end_on_cpu(tmp_path):
  _bench('--op=gmm', '--grid=tiny', '--repeats=2', f'--out={tmp_path}', '--name=g',
         '--compilation_cache_dir=')
  rows = json.loads((tmp_path / 'g.json').read_text())['rows'][1:]
  expected = set()
  for g, k, n in kbg.GMM_GRIDS['tiny'].shapes:
    for mode in ('fwd', 'fwd+bwd'):
      group = f'M=256 G={g} K={k} N={n}'
      expected |= {(group, 'uniform', impl, mode)
                   for impl in ('effjax', 'tokamax', 'ragged_dot', 'einsum')}
      expected |= {(group, 'skewed', impl, mode) for impl in ('effjax', 'tokamax', 'ragged_dot')}
  assert {(r['group'], r['variant'], r['impl'], r['mode']) for r in rows} == expected
  by_key = {(r['group'], r['variant'], r['impl'], r['mode']): r for r in rows}
  for r in rows:
    assert 'error' not in r, r['error']
    if r['impl'] == 'tokamax':  # an optional peer: skipped with the reason where not installed
      assert 'ms' in r or 'tokamax is not importable' in r['skipped']
      if 'ms' not in r:
        continue
    if r['impl'] in ('effjax', 'tokamax'):  # checked against float32 ragged_dot before timing
      assert r['rel_err'] < 1e-2 and 'check' not in r
    factor = 3.0 if r['mode'] == 'fwd+bwd' else 1.0
    assert r['useful_flops'] == 2.0 * r['rows'] * r['k'] * r['n'] * factor
    einsum = by_key[(r['group'], 'uniform', 'einsum', r['mode'])]
    if r['variant'] == 'skewed':
      uniform = by_key[(r['group'], 'uniform', r['impl'], r['mode'])]
      assert r['speedup_vs_dense'] == pytest.approx(uniform['ms'] / r['ms'])
      assert r['speedup_vs_baseline_dense'] == pytest.approx(einsum['ms'] / r['ms'])
    else:
      assert r['speedup_vs_baseline'] == pytest.approx(einsum['ms'] / r['ms'])
    if r['impl'] == 'effjax':
      assert r['backend'] == 'ragged_dot'  # what 'auto' picks on CPU
  assert 'vs einsum uniform (x)' in (tmp_path / 'g.md').read_text()


@pytest.mark.parametrize('mode', ['fwd', 'fwd+bwd'])
def test_gmm_implementations_compute_the_same_product(mode):
  """On uniform groups every implementation is the same grouped product (and its gradients)."""
  m, g, k, n = 64, 4, 32, 48
  lhs, rhs, sizes, ct = kbg._inputs(m, g, k, n, 'uniform')[0]
  results = [kbg._with_mode(kbg._product(impl, m, g), mode)(lhs, rhs, sizes, ct)
             for impl in ('effjax', 'ragged_dot', 'einsum')]
  for other in results[1:]:
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(other)):
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                 rtol=2e-2, atol=2e-2)


def test_skewed_group_sizes_sum_to_the_rows_and_vary():
  rng = np.random.default_rng()
  draws = np.stack([kbg.group_sizes(1024, 16, 'skewed', rng) for _ in range(32)])
  assert (draws.sum(axis=1) == 1024).all() and draws.dtype == np.int32
  assert (draws.min(axis=1) < draws.max(axis=1)).all()
  # Dirichlet(1) over 16 groups: the largest share averages H_16 / 16 (about 0.21) of the rows,
  # far above the uniform 1/16; averaged over 32 draws it is above 1.5/16 with near certainty.
  assert draws.max(axis=1).mean() > 1.5 * 1024 / 16
  assert (kbg.group_sizes(1024, 16, 'uniform', rng) == 64).all()


def test_scan_tiny_grid_runs_end_to_end_on_cpu(tmp_path):
  _bench('--op=scan', '--grid=tiny', '--repeats=2', f'--out={tmp_path}', '--name=s',
         '--compilation_cache_dir=')
  rows = json.loads((tmp_path / 's.json').read_text())['rows'][1:]
  grid = kbs.SCAN_GRIDS['tiny']
  expected = {(f'S={s} B={grid.tokens // s}', variant, impl, mode)
              for s in grid.seq_lens for variant, *_ in grid.shapes for mode in ('fwd', 'fwd+bwd')
              for impl in ('effjax', 'xla', 'reference', 'cudnn')}
  assert {(r['group'], r['variant'], r['impl'], r['mode']) for r in rows} == expected
  for r in rows:
    if r['impl'] == 'cudnn':
      assert 'needs a GPU' in r['skipped']
      continue
    assert 'error' not in r, r['error']
    assert r['mtokens_per_s'] == pytest.approx(r['tokens'] / r['ms'] / 1e3)
    assert r['tokens'] == r['batch'] * r['seq_len'] and r['backend'] != 'auto'
  assert 'Mtokens/s' in (tmp_path / 's.md').read_text()


@pytest.mark.parametrize('mode', ['fwd', 'fwd+bwd'])
def test_scan_implementations_agree(mode):
  args = kbs._inputs(2, 48, 2, 16, 8)[0]
  outs = [kbs._scan_fn(impl, mode)(*args) for impl in ('effjax', 'xla', 'reference')]
  for other in outs[1:]:
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(other)):
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                 rtol=5e-2, atol=5e-2)


def test_profile_dir_traces_the_case_and_names_its_ops(tmp_path):
  """--profile_dir: the case's calls are traced; the row says where one call's time goes."""
  g, k, n = kbg.GMM_GRIDS['tiny'].shapes[0]
  case = kbg.gmm_case('effjax', 'fwd+bwd', 'skewed', rows=256, groups=g, k=k, n=n)
  row = kb.measure('gmm', case, repeats=2, profile_dir=str(tmp_path / 'trace'))
  assert 'profile_error' not in row, row['profile_error']
  top = row['profile_top']
  assert 0 < len(top) <= kb.PROFILE_TOP and row['profile_ms'] > 0
  assert [t['ms'] for t in top] == sorted((t['ms'] for t in top), reverse=True)
  assert sum(t['percent'] for t in top) <= 100 + 1e-6
  assert all(t['per_call'] > 0 for t in top)
  summary = (tmp_path / 'trace' / 'summary.txt').read_text()
  assert top[0]['name'][:40] in summary
  assert 'device' in kb._describe(row)  # pylint: disable=protected-access


def test_qmm_tiny_grid_runs_end_to_end_on_cpu(tmp_path):
  """Every (shape, M, implementation) row, checked against float32 before timing; the kernel
  rows run the Triton kernel in interpret mode here; rates are per product."""
  _bench('--op=qmm', '--grid=tiny', '--repeats=2', f'--out={tmp_path}', '--name=q',
         '--compilation_cache_dir=')
  rows = json.loads((tmp_path / 'q.json').read_text())['rows'][1:]
  grid = kbq.QMM_GRIDS['tiny']
  expected = {(f'M={m} K={k} N={n}', impl) for k, n in grid.shapes for m in grid.rows
              for impl in kbq.IMPLS}
  assert {(r['group'], r['impl']) for r in rows} == expected and len(rows) == len(expected)
  by_key = {(r['group'], r['impl']): r for r in rows}
  for r in rows:
    if r['impl'].startswith('gemv') and r['group'].startswith('M=16'):
      assert 'one row' in r['skipped'], r  # the GEMV kernels take M = 1 only
      continue
    assert 'error' not in r and 'skipped' not in r, r
    assert r['variant'] == 'decode' and r['mode'] == 'fwd'
    assert r['rel_err'] < 1e-2 and 'check' not in r
    assert r['bytes'] == kbq.weight_bytes(r['impl'], r['k'], r['n'])
    assert r['gb_per_s'] == pytest.approx(r['bytes'] / r['ms'] / 1e6)
    assert r['useful_flops'] == 2.0 * r['m'] * r['k'] * r['n']
    assert r['products_per_call'] >= 2 and len(r['ms_calls']) == 2
    assert r['ms'] == pytest.approx(np.median(r['ms_calls']) / r['products_per_call'])
    baseline = by_key[(r['group'], 'bf16')]
    assert r['speedup_vs_baseline'] == pytest.approx(baseline['ms'] / r['ms'])
    if r['impl'].startswith(('effjax', 'gemv')):
      assert r['backend'] == 'triton' and r['interpret'] is True
      assert r['gemv'] == r['impl'].startswith('gemv')
      bn, bk, split = r['tiling']
      assert r['n'] % bn == 0 and r['k'] % (bk * split) == 0
  int4 = by_key[(f'M=1 K={grid.shapes[0][0]} N={grid.shapes[0][1]}', 'effjax_int4')]
  assert int4['bytes'] < by_key[(int4['group'], 'effjax_int8')]['bytes'] < \
      by_key[(int4['group'], 'bf16')]['bytes']
  assert 'GB/s read' in (tmp_path / 'q.md').read_text()


def test_qmm_tune_grid_names_its_tilings_and_skips_the_invalid_ones():
  cases = list(kbq.qmm_cases('tune', ('effjax_int8',)))
  k, n = kbq.QMM_GRIDS['tune'].shapes[0]
  first = [c for c in cases if c.group == f'M=1 K={k} N={n}']
  assert [c.impl for c in first[:2]] == ['bf16', 'effjax_int8']
  assert {c.impl for c in first[2:]} == {f'effjax_int8 {bn},{bk},{s}'
                                         for bn, bk, s in kbq.TUNE_TILINGS}
  for case in first[2:]:
    bn, bk, split = case.info.get('tiling') or map(int, case.impl.split()[1].split(','))
    assert (case.skip is None) == (k % (bk * split) == 0 and n % bn == 0), case.skip


def test_decode_attention_tiny_grid_runs_end_to_end_on_cpu(tmp_path):
  """Every (shape, implementation) row checked against float32 before timing, the kernel in
  interpret mode here, cuDNN skipped off the GPU; rates per product of cache bytes read."""
  _bench('--op=decode_attention', '--grid=tiny', '--repeats=2', f'--out={tmp_path}',
         '--name=d', '--compilation_cache_dir=')
  rows = json.loads((tmp_path / 'd.json').read_text())['rows'][1:]
  grid = kbd.GRIDS['tiny']
  assert len(rows) == len(grid.new_tokens) * len(kbd.IMPLS)
  by_key = {(r['group'], r['impl']): r for r in rows}
  for r in rows:
    if r['impl'] == 'cudnn':
      assert 'needs a GPU' in r['skipped']
      continue
    assert 'error' not in r and 'skipped' not in r, r
    assert r['rel_err'] < 1e-2 and 'check' not in r
    assert r['bytes'] == kbd.cache_bytes(r['batch'], r['new_tokens'], r['cache_slots'],
                                         r['kv_heads'], r['head_dim'])
    assert r['gb_per_s'] == pytest.approx(r['bytes'] / r['ms'] / 1e6)
    assert r['speedup_vs_baseline'] == pytest.approx(by_key[(r['group'], 'xla')]['ms'] / r['ms'])
  assert any(r['impl'] == 'effjax' and r['interpret'] is True for r in rows)


def test_an_implementation_failing_its_check_is_not_timed():
  """The op's precheck runs first; an implementation with a failing check row gets its timed
  rows skipped with the reason, the others run as usual."""
  def make():
    x = np.random.default_rng().standard_normal((8, 8)).astype(np.float32)
    return (lambda a: a @ a), [(x,)] * 3

  def cases(grid, impls):
    for impl in impls:
      yield kb.Case(group='g', variant='dense', impl=impl, mode='fwd', useful_flops=1.0,
                    make=make)

  def precheck(grid, impls):
    return [{'op': 'toy', 'group': 'case 0', 'variant': 'causal', 'impl': impl, 'mode': 'check',
             'check': 'ok' if impl == 'good' else 'FAIL', 'rel_err': 0.0 if impl == 'good' else 1.0,
             'rel_errs': {}} for impl in impls]

  op = kb.Op(name='toy', impls=('good', 'bad'), baseline='good', cases=cases, precheck=precheck,
             grids=('tiny',))
  rows = kb.run(op, grid='tiny', impls=op.impls, repeats=2, log=lambda *a: None)
  assert [r['mode'] for r in rows] == ['fwd', 'check', 'check', 'fwd', 'fwd']
  good, bad = rows[3], rows[4]
  assert good['ms'] > 0 and 'skipped' not in good
  assert 'failed the correctness check' in bad['skipped'] and 'ms' not in bad
  text = kb.summary(rows, op)
  assert 'correctness good: 1/1 random cases ok' in text
  assert 'correctness bad: 0/1 random cases ok' in text


@pytest.mark.parametrize('grid', sorted(kb.ATTENTION_GRIDS))
def test_every_attention_grid_lists_its_dense_window_and_sparse_rows(grid):
  g = kb.ATTENTION_GRIDS[grid]
  impls = ('effjax', 'cudnn')
  cases = list(kb.attention_cases(grid, impls))
  variants = {c.variant.split('=')[0].split(' ')[0] for c in cases}
  assert 'dense' in variants
  if g.restricted_seq_len in g.seq_lens:
    assert {'window', 'bigbird'} <= variants
  assert len({(c.group, c.variant, c.impl, c.mode) for c in cases}) == len(cases)
