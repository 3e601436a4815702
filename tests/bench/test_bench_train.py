"""The training benchmark harness: sweeps, result files, and its errors (tiny model, CPU)."""

import json
import pathlib
import subprocess
import sys

import pytest

from effjax.bench.train import parse_sweep, variant_name

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ['--config=configs/default.py', '--config.model.d_model=64', '--config.model.mlp_dim=128',
        '--config.model.num_layers=2', '--config.data.seq_len=32', '--config.train.batch_size=8',
        '--warmup_steps=1', '--steps=2', '--repeats=2']


def _bench(*args, expect_rc=0, cache=None):
  cmd = [sys.executable, '-m', 'effjax.bench', *args]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
  assert proc.returncode == expect_rc, proc.stderr[-3000:]
  return proc


def test_parse_sweep_is_a_cartesian_product():
  variants = parse_sweep(['train.batch_size=8,16', 'model.remat_policy=none,full,dots'])
  assert len(variants) == 6
  assert variants[0] == {'train.batch_size': '8', 'model.remat_policy': 'none'}
  assert variant_name(variants[-1]) == 'batch_size=16 remat_policy=dots'
  assert parse_sweep([]) == [{}]
  assert parse_sweep(['xla_flags=,--a=1']) == [{'xla_flags': ''}, {'xla_flags': '--a=1'}]
  with pytest.raises(ValueError, match='expected KEY=V1,V2'):
    parse_sweep(['train.batch_size'])


def test_sweep_writes_json_and_markdown_and_never_overwrites(tmp_path):
  out = tmp_path / 'results'
  args = ['train', *TINY, f'--out={out}', '--name=tiny', f'--compilation_cache_dir={tmp_path}/c',
          '--sweep=model.remat_policy=none,full', '--batches=packed']
  _bench(*args)
  record = json.loads((out / 'tiny.json').read_text())
  env, rows = record['environment'], record['rows']
  assert env['platform'] == 'cpu' and env['jax'] and 'effjax.bench' in env['command']
  assert [r['name'] for r in rows] == ['remat_policy=none', 'remat_policy=full']
  for row in rows:
    assert row['tokens_per_step'] == 8 * 32 and row['step_time_ms'] > 0
    assert row['tokens_per_second'] == pytest.approx(256 / row['step_time_ms'] * 1e3)
    assert len(row['step_time_windows_ms']) == 2 and row['batches'] == 'packed'
    assert row['config']['model']['remat_policy'] == row['overrides']['model.remat_policy']
    assert row['mfu'] is None  # no known peak for a CPU: no MFU claimed
    parts = row['compiled_memory_breakdown_gb']  # the compiled step's memory, by kind
    assert set(parts) == {'argument', 'output', 'temp', 'alias'}
    assert row['compiled_memory_gb'] == pytest.approx(
        parts['argument'] + parts['output'] + parts['temp'] - parts['alias'])
  markdown = (out / 'tiny.md').read_text()
  assert '| remat_policy=full |' in markdown and 'tokens/s' in markdown
  # the code that ran, by a hash of the package's sources (matches this checkout's)
  from effjax.bench import results
  assert env['code_digest'] == results.code_digest() and len(env['code_digest']) == 12
  assert f"(code {env['code_digest']})" in markdown
  _bench(*args[:-2])  # same name again, single in-process variant
  assert (out / 'tiny-2.json').exists() and (out / 'tiny.json').read_text() == json.dumps(
      record, indent=2, default=str)


def test_bad_requests_are_one_clear_error():
  proc = _bench('inference', *TINY, expect_rc=2)
  assert 'say what to benchmark: one of train, kernels, decode (got inference)' in proc.stderr
  proc = _bench('train', *TINY, '--sweep=train.batch_size', expect_rc=2)
  assert 'expected KEY=V1,V2' in proc.stderr
  proc = _bench('train', *TINY, '--config.model.num_heads=5', expect_rc=2)
  assert 'config error: model.num_heads=5' in proc.stderr


def test_a_failed_sweep_variant_keeps_the_sweep_and_says_why(tmp_path):
  out = tmp_path / 'results'
  _bench('train', *TINY, f'--out={out}', '--name=mixed', f'--compilation_cache_dir={tmp_path}/c',
         '--sweep=model.remat_policy=none,sometimes')
  rows = json.loads((out / 'mixed.json').read_text())['rows']
  assert rows[0]['step_time_ms'] > 0 and 'error' not in rows[0]
  assert rows[1]['error'] == 'exit status 2'
  assert "model.remat_policy='sometimes'" in rows[1]['error_detail'], rows[1]['error_detail']


def test_alternate_times_zipped_variants_in_one_process(tmp_path):
  out = tmp_path / 'results'
  _bench('train', *TINY[:-1], '--repeats=3', f'--out={out}', '--name=alt',
         '--compilation_cache_dir=', '--alternate=model.remat_policy=none,full',
         '--alternate=train.batch_size=8,16')
  rows = json.loads((out / 'alt.json').read_text())['rows']
  assert [r['name'] for r in rows] == ['remat_policy=none batch_size=8',
                                       'remat_policy=full batch_size=16']
  assert [r['tokens_per_step'] for r in rows] == [8 * 32, 16 * 32]
  assert rows[1]['config']['model']['remat_policy'] == 'full'
  assert rows[1]['overrides'] == {'model.remat_policy': 'full', 'train.batch_size': '16'}
  assert rows[0]['speedup_vs_first'] == 1.0
  # a ratio of tokens/s, not of step times: per round, (first's s / 256) / (this one's s / 512)
  per_round = [(a / 256) / (b / 512) for a, b in zip(rows[0]['step_time_windows_ms'],
                                                   rows[1]['step_time_windows_ms'])]
  assert rows[1]['speedup_vs_first'] == pytest.approx(sorted(per_round)[1])
  for row in rows:
    assert row['rounds'] == 3 and len(row['step_time_windows_ms']) == 3
    lo, hi = map(float, row['speedup_spread'].split('-'))
    assert lo <= row['speedup_vs_first'] <= hi
    assert row['loss_last'] == row['loss_last']  # trained on: a number
  assert '| speedup vs first |' in (out / 'alt.md').read_text()


def test_alternate_values_split_on_slashes_where_values_hold_commas():
  from effjax.bench.train import parse_alternate
  assert parse_alternate(['model.exit_layers=2,4/4']) == [{'model.exit_layers': '2,4'},
                                                          {'model.exit_layers': '4'}]
  assert parse_alternate(['train.batch_size=8,16']) == [{'train.batch_size': '8'},
                                                        {'train.batch_size': '16'}]


def test_a_variant_that_fails_to_build_is_a_row_and_the_rest_still_run():
  from configs import default
  from effjax.bench.train import measure_alternating
  good = default.get_config()
  good.model.d_model, good.model.mlp_dim, good.model.num_layers = 32, 64, 1
  good.data.seq_len, good.train.batch_size = 16, 8  # one row per forced CPU device
  bad = default.get_config()
  bad.model.d_model, bad.model.mlp_dim, bad.model.num_layers = 32, 64, 1
  bad.model.num_heads = 3  # 32 is not a multiple of 3: fails to build
  rows = measure_alternating([('good', good), ('bad', bad), ('good again', good)], steps=1,
                             rounds=2, warmup_steps=1)
  assert [r['name'] for r in rows] == ['good', 'bad', 'good again']
  assert rows[1]['error'] and 'step_time_ms' not in rows[1]
  assert rows[0]['speedup_vs_first'] == 1.0 and rows[2]['speedup_vs_first'] > 0
  rows = measure_alternating([('bad', bad), ('good', good)], steps=1, rounds=1, warmup_steps=1)
  assert rows[0]['error'] and 'speedup_vs_first' not in rows[1]


@pytest.mark.parametrize('args, message', [
    (['--alternate=model.remat_policy=none,full', '--alternate=train.batch_size=8'],
     'effjax.bench: --alternate: every list needs the same number of values, at least two'),
    (['--alternate=model.remat_policy=none,full', '--sweep=train.batch_size=8,16'],
     'effjax.bench: --sweep and --alternate are two ways to compare variants: give one'),
    (['--alternate=xla_flags=,--a=1'],
     "effjax.bench: --alternate='xla_flags=,--a=1': expected section.field=V1,V2,... (config "
     "fields only: xla_flags is the process's, use --sweep"),
    (['--alternate=model.remat_policy=none,sometimes'],  # checked before anything is built
     "effjax.bench: model.remat_policy='sometimes': allowed values are"),
    (['--alternate=model.remat_policy=none,full', '--profile_dir=/tmp/p'],
     "effjax.bench: --profile_dir traces one config's steps: not with --alternate"),
])
def test_bad_alternation_is_one_clear_error(args, message):
  proc = _bench('train', *TINY, '--compilation_cache_dir=', *args, expect_rc=2)
  assert 'Traceback' not in proc.stderr
  assert message in proc.stderr.strip().splitlines()[-1]
