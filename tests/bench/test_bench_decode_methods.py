"""The decoding benchmark's method rows on a tiny config: one row per (context, method) with ms per
token, bytes per step, the measured bandwidth and its roofline fraction, acceptance and speedup."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ['--config.model.d_model=32', '--config.model.num_layers=2', '--config.model.num_heads=2',
        '--config.model.num_kv_heads=2', '--config.model.mlp_dim=64',
        '--config.model.exit_layers=1']


def test_method_rows(tmp_path):
  cmd = [sys.executable, '-m', 'effjax.bench', 'decode', '--compilation_cache_dir=',
         '--config=configs/default.py', *TINY, '--contexts=16', '--decode_steps=6',
         '--repeats=1', '--methods=plain,early_exit,self_speculative,speculative',
         '--exit_threshold=0.0', '--bandwidth_mb=8', f'--out={tmp_path}', '--name=m',
         '--config.infer.gamma=2', f'--profile_dir={tmp_path / "prof"}']
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads((tmp_path / 'm.json').read_text())['rows']
  assert [r['method'] for r in rows] == ['plain', 'early_exit', 'self_speculative', 'speculative']
  for r in rows:
    assert 'error' not in r, r['error']
    assert r['ms_per_token'] > 0 and r['mb_per_token'] > 0 and r['bandwidth_gbs'] > 0
    assert 0 < r['roofline_fraction'] and r['speedup_vs_plain'] > 0
    # the same bytes over the read-only bandwidth: the two fractions in the bandwidths' ratio
    assert r['read_bandwidth_gbs'] > 0 and r['read_roofline_fraction'] == pytest.approx(
        r['roofline_fraction'] * r['bandwidth_gbs'] / r['read_bandwidth_gbs'])
  assert rows[0]['speedup_vs_plain'] == 1.0
  assert rows[1]['exit_fraction'] == 1.0  # threshold 0: every token leaves at the first exit
  assert rows[1]['mb_per_token'] < rows[0]['mb_per_token']
  for r in rows[2:]:
    assert 0 <= r['acceptance_rate'] <= 1 and 1 <= r['tokens_per_round'] <= 3
  assert '| speedup vs plain |' in (tmp_path / 'm.md').read_text()
  assert '| of read roofline |' in (tmp_path / 'm.md').read_text()
  for r in rows:  # each row's loop traced once: time per kernel name
    assert ' ms in ' in r['profile_summary'], r['profile_summary']
  assert 'device time per kernel' in proc.stdout


def test_unknown_method_is_one_clear_error():
  proc = subprocess.run([sys.executable, '-m', 'effjax.bench', 'decode',
                         '--config=configs/default.py', '--methods=fast'], capture_output=True,
                        text=True, timeout=300, cwd=REPO_ROOT, check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      "effjax.bench decode: --methods=fast: unknown 'fast'; allowed: plain, early_exit, "
      'self_speculative, speculative')


def test_step_bytes_count_every_exit_asked():
  """A token leaving at exit e read the layers up to it, e + 1 output projections and the
  deeper layers' key/value weights; one going full depth read the head once per exit asked
  plus the final one."""
  import jax
  from flax import nnx

  from effjax.bench.decode_methods import _kv_weight_bytes, step_bytes
  from effjax.infer.engine import Engine
  from effjax.models import lm as lm_lib
  from tests.helpers import tiny_config

  engine = Engine(*nnx.split(lm_lib.LM(tiny_config(num_layers=4, exit_layers='1,2').model,
                                       rngs=nnx.Rngs(0))))
  caches = engine.init_cache(1, 8)
  head = engine.param_bytes(0, 0, head=True)
  body = engine.param_bytes(head=False)
  size = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))
  cache = size(caches)
  assert step_bytes(engine, caches) == body + head + cache
  assert step_bytes(engine, caches, asked=2) == body + 3 * head + cache
  first = step_bytes(engine, caches, 0)
  deeper = sum(_kv_weight_bytes(engine, i) for i in range(1, 4))
  assert first == engine.param_bytes(0, 1, head=False) + head + deeper + size(caches[:1])
  assert step_bytes(engine, caches, 1) - engine.param_bytes(0, 2, head=False) > 2 * head


def test_alternating_rows(tmp_path):
  """--alternate: one row per (context, value), the two engines timed in alternation; the same
  step bytes for both (folding the norms changes no sizes), the first value's ratio 1."""
  cmd = [sys.executable, '-m', 'effjax.bench', 'decode', '--compilation_cache_dir=',
         '--config=configs/default.py', *TINY, '--contexts=16,24', '--decode_steps=4',
         '--repeats=3', '--alternate=infer.fold_norms=False,True', '--bandwidth_mb=8',
         f'--out={tmp_path}', '--name=a', f'--profile_dir={tmp_path / "prof"}']
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads((tmp_path / 'a.json').read_text())['rows']
  assert [(r['variant'], r['context']) for r in rows] == [
      ('fold_norms=False', 16), ('fold_norms=True', 16), ('fold_norms=False', 24),
      ('fold_norms=True', 24)]
  for r in rows:
    assert 'error' not in r, r['error']
    assert r['ms_per_token'] > 0 and len(r['seconds']) == 3 and r['rounds'] == 3
    assert r['roofline_fraction'] > 0 and r['read_roofline_fraction'] > 0
    lo, hi = map(float, r['speedup_spread'].split('-'))
    assert lo <= r['speedup_vs_first'] <= hi
    assert ' ms in ' in r['profile_summary']
  assert rows[0]['speedup_vs_first'] == 1.0 and rows[2]['speedup_vs_first'] == 1.0
  assert rows[0]['mb_per_token'] == rows[1]['mb_per_token'] < rows[2]['mb_per_token']
  assert '| speedup vs first |' in (tmp_path / 'a.md').read_text()


def test_alternation_labels_and_lists():
  """List-valued options take '/' between values; an empty value is labelled as such."""
  from configs import default
  from effjax.bench.decode_methods import alternate_configs
  got = alternate_configs(default.get_config(), ['infer.output_major=wo/wo,w_down/'])
  assert [label for label, _ in got] == ['output_major=wo', 'output_major=wo,w_down',
                                         "output_major=''"]
  assert [c.infer.output_major for _, c in got] == ['wo', 'wo,w_down', '']
  # several options zipped: one engine per column of values
  got = alternate_configs(default.get_config(), ['infer.fold_norms=False,True,False',
                                                 'infer.decode_attention_tiling=//64:1:8:3'])
  assert [label for label, _ in got] == [
      "fold_norms=False decode_attention_tiling=''", "fold_norms=True decode_attention_tiling=''",
      'fold_norms=False decode_attention_tiling=64:1:8:3']
  assert [(c.infer.fold_norms, c.infer.decode_attention_tiling) for _, c in got] == [
      (False, ''), (True, ''), (False, '64:1:8:3')]


@pytest.mark.parametrize('args, message', [
    (['--alternate=infer.gamma=2,4'],
     "--alternate='infer.gamma=2,4': expected infer.OPTION=V1,V2,... with OPTION one of "
     'weights_dtype, attention_kernel, output_major, qmm_output_major, cache_write_in_kernel, '
     'output_major_kernel, fold_norms, decode_attention_tiling (the options that change the '
     'engine)'),
    (['--alternate=infer.fold_norms=True'],
     '--alternate: every list needs the same number of values, at least two (the i-th variant '
     "takes each list's i-th value); got infer.fold_norms=True"),
    (['--alternate=infer.fold_norms=False,True,False'],
     "--alternate: variants 1 and 3 are the same (infer.fold_norms='False'); give different "
     'values'),
    (['--alternate=infer.fold_norms=False,yes'],
     "infer.fold_norms='yes': not of type bool, the type of infer.fold_norms"),
    (['--alternate=infer.fold_norms=False,True', '--methods=plain,speculative'],
     '--alternate times plain decoding only; got --methods=plain,speculative'),
    (['--alternate=infer.fold_norms=False,True', '--draft_config=configs/default.py',
      '--exit_threshold=0.5'],
     '--alternate times plain decoding: --draft_config, --exit_threshold would be ignored'),
    (['--alternate=infer.fold_norms=False,True', '--repeats=0'],
     '--repeats=0: --alternate needs at least one round'),
    (['--alternate=infer.fold_norms=False,True', '--alternate=infer.weights_dtype=float32'],
     '--alternate: every list needs the same number of values, at least two (the i-th variant '
     "takes each list's i-th value); got infer.fold_norms=False,True, "
     'infer.weights_dtype=float32'),
])
def test_bad_alternation_is_one_clear_error(args, message):
  proc = subprocess.run([sys.executable, '-m', 'effjax.bench', 'decode',
                         '--config=configs/default.py', *args], capture_output=True,
                        text=True, timeout=300, cwd=REPO_ROOT, check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == f'effjax.bench decode: {message}'
