"""The decoding benchmark: rows per context length, the cache's size, clear errors."""

import json
import pathlib
import statistics
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ['--config.model.d_model=32', '--config.model.num_layers=2', '--config.model.num_heads=2',
        '--config.model.num_kv_heads=2', '--config.model.mlp_dim=64']


def _bench(*args, expect_rc=0):
  cmd = [sys.executable, '-m', 'effjax.bench', 'decode', '--compilation_cache_dir=', *args]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                        check=False)
  assert proc.returncode == expect_rc, proc.stderr[-3000:]
  return proc


@pytest.mark.parametrize('pattern, grows', [('attention:mlp', True), ('gla:mlp', False)])
def test_rows_per_context_and_cache_growth(tmp_path, pattern, grows):
  _bench('--config=configs/default.py', f'--config.model.pattern={pattern}', *TINY,
         '--contexts=16,256', '--decode_steps=4', '--repeats=2', f'--out={tmp_path}',
         '--name=d')
  rows = json.loads((tmp_path / 'd.json').read_text())['rows']
  assert [r['context'] for r in rows] == [16, 256]
  for r in rows:
    assert 'error' not in r and r['ms_per_step'] > 0
    assert r['tokens_per_s'] == pytest.approx(r['batch'] * r['steps'] /
                                              statistics.median(r['seconds']))
  assert rows[0]['relative_to_shortest'] == 1.0
  # A key/value cache grows with the context; a recurrent state does not.
  assert (rows[1]['cache_mb'] > 5 * rows[0]['cache_mb']) is grows
  if not grows:
    assert rows[1]['cache_mb'] == rows[0]['cache_mb']


def test_bad_contexts_are_one_clear_error():
  proc = _bench('--config=configs/default.py', '--contexts=0', expect_rc=2)
  assert proc.stderr.strip() == 'effjax.bench decode: --contexts=0: give positive lengths'


def test_folded_norms_without_the_engine_rows_is_one_clear_error():
  proc = _bench('--config=configs/default.py', '--contexts=8', '--config.infer.fold_norms=True',
                expect_rc=2)
  assert 'applies to the decoding engine' in proc.stderr and '--methods' in proc.stderr
