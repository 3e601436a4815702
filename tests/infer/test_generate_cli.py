"""`--mode=generate` end to end with every infer.method on a tiny trained checkpoint with an exit,
prompts from a file, and the errors: a draft with another vocabulary, a prompt longer than the
cache, an unknown method, a mixer that cannot decode."""

import json
import subprocess
import sys

import pytest
from flax import nnx

from effjax.infer.engine import Engine
from effjax.models import lm as lm_lib
from effjax.models.registry import MIXERS
from tests.helpers import tiny_config

TINY = ['--config.data.max_documents=40', '--config.model.d_model=64',
        '--config.model.mlp_dim=128', '--config.data.seq_len=64', '--config.optim.warmup_steps=1',
        '--config.train.log_every=1', '--config.train.eval_batches=1',
        '--config.model.exit_layers=2', '--config.model.exit_head=norm',
        '--config.generate.max_new_tokens=6', '--config.generate.at_end=False']

DRAFT = """from configs import base


def get_config():
  c = base.get_config()
  c.model.d_model, c.model.num_layers, c.model.mlp_dim = 32, 1, 64
  c.model.vocab_size = {vocab}
  return c
"""


def _run(workdir, data_dir, *extra, expect_rc=0):
  cmd = [sys.executable, '-m', 'effjax.main', '--config=configs/default.py',
         f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', '--config.train.steps=2',
         *TINY, *extra]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert proc.returncode == expect_rc, proc.stderr[-3000:]
  return proc.stdout if expect_rc == 0 else proc.stderr


@pytest.fixture(scope='module')
def trained(tmp_path_factory, stdlib_data_dir):
  workdir = tmp_path_factory.mktemp('gen') / 'run'
  out = _run(workdir, stdlib_data_dir)
  records = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert any('train/exit2_loss' in r and 'train/exit2_accuracy' in r for r in records), out
  assert any('eval/exit2_loss' in r for r in records)
  return workdir, stdlib_data_dir


def test_every_method_generates(trained, tmp_path):
  workdir, data_dir = trained
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('def f(x):\\n    return\nimport os\n')
  draft = tmp_path / 'draft.py'
  draft.write_text(DRAFT.format(vocab=384))
  for method in ('plain', 'early_exit', 'self_speculative', 'speculative'):
    extra = [f'--config.infer.method={method}', f'--config.generate.prompts_file={prompts}',
             '--config.generate.temperature=0', f'--config.infer.draft_config={draft}']
    if method == 'early_exit':
      extra.append('--config.infer.exit_tolerance=0.05')
    out = _run(workdir, data_dir, '--mode=generate', *extra)
    assert out.count('-----') == 1 and 'def f(x):\n    return' in out and 'import os' in out
    assert f'method {method}, 2 prompt(s)' in out
    if method.endswith('speculative'):
      assert 'acceptance' in out
    if method == 'early_exit':
      assert 'calibrated infer.exit_threshold=' in out
  records = [json.loads(l) for l in (workdir / 'generate.jsonl').read_text().splitlines()]
  assert len(records) == 8 and {r['method'] for r in records} == {
      'plain', 'early_exit', 'self_speculative', 'speculative'}
  # Greedy: every method continues each prompt with the same tokens.
  by_prompt = {}
  for r in records:
    by_prompt.setdefault(r['prompt'], set()).add(tuple(r['tokens']))
  assert all(len(v) == 1 for v in by_prompt.values())


def test_errors(trained, tmp_path):
  workdir, data_dir = trained
  draft = tmp_path / 'draft.py'
  draft.write_text(DRAFT.format(vocab=512))
  err = _run(workdir, data_dir, '--mode=generate', '--config.infer.method=speculative',
             f'--config.infer.draft_config={draft}', expect_rc=1)
  assert 'model.vocab_size=512 differs from the target' in err.strip().splitlines()[-1]
  err = _run(workdir, data_dir, '--mode=generate', '--config.infer.max_len=8', expect_rc=1)
  assert 'does not fit the cache of infer.max_len=8' in err.strip().splitlines()[-1]
  err = _run(workdir, data_dir, '--mode=generate', '--config.infer.output_major=wo,w_outt',
             expect_rc=1)
  assert 'infer.output_major: no weight called w_outt in this model' in err.strip().splitlines()[-1]
  err = _run(workdir, data_dir, '--mode=generate', '--config.infer.method=fast', expect_rc=2)
  assert err.strip().splitlines()[-1] == (
      "effjax: config error: infer.method='fast': allowed values are plain, early_exit, "
      'self_speculative, speculative')
  err = _run(workdir, data_dir, '--mode=generate', '--config.infer.method=speculative',
             expect_rc=2)
  assert "infer.draft_config=''" in err


def test_a_mixer_without_decoding_is_one_clear_error():
  class NoDecode(MIXERS.get('attention')):
    decode = None

  MIXERS._entries['nodecode_test'] = NoDecode  # pylint: disable=protected-access
  try:
    model = lm_lib.LM(tiny_config(pattern='nodecode_test:mlp').model, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="the 'nodecode_test' mixer cannot decode"):
      Engine(*nnx.split(model))
  finally:
    del MIXERS._entries['nodecode_test']  # pylint: disable=protected-access
