"""The command line end to end: train, log, checkpoint, sample; the same command resumes."""

import json
import subprocess
import sys

import numpy as np


def _run(workdir, data_dir, steps, *extra, expect_rc=0):
  cmd = [sys.executable, '-m', 'effjax.main', '--config=configs/default.py', f'--workdir={workdir}',
         f'--config.data.data_dir={data_dir}', '--config.data.max_documents=40',
         '--config.model.d_model=64', '--config.model.mlp_dim=128', '--config.data.seq_len=64',
         f'--config.train.steps={steps}', '--config.train.log_every=2',
         '--config.train.eval_every=2', '--config.train.eval_batches=1',
         '--config.train.checkpoint_every=2', '--config.optim.warmup_steps=1',
         '--config.generate.max_new_tokens=8', *extra]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert proc.returncode == expect_rc, proc.stderr[-3000:]
  return proc.stdout if expect_rc == 0 else proc.stderr


def test_train_then_rerun_resumes(tmp_path, stdlib_data_dir):
  workdir = tmp_path / 'run'
  out = _run(workdir, stdlib_data_dir, 4)
  assert 'step 4/4 | loss' in out and 'tok/s' in out and 'ETA' in out
  assert 'eval at step 2: loss' in out and 'held-out tokens' in out
  assert 'sample:\ndef fibonacci(n):\n' in out
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['2', '4']
  assert list((workdir / 'tb').glob('events.out.tfevents.*'))
  records = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train_steps = [r['step'] for r in records if 'train/loss' in r]
  assert train_steps == [1, 2, 4]  # the first step's loss, then every log_every
  first, second = [r for r in records if 'train/loss' in r][:2]
  assert 'train/tokens_per_second' not in first  # its time includes compilation: no rates
  assert {'train/learning_rate', 'train/grad_norm', 'train/tokens_per_second',
          'train/step_time_ms'} <= set(second)

  out = _run(workdir, stdlib_data_dir, 6)
  assert 'resumed from the checkpoint at step 4' in out
  assert 'step 6/6' in out and 'step 2/6' not in out
  assert json.loads((workdir / 'summary.json').read_text())['start_step'] == 4

  out = _run(workdir, stdlib_data_dir, 6, '--mode=eval')
  assert 'eval of step 6: loss' in out
  out = _run(workdir, stdlib_data_dir, 6, '--mode=generate', '--config.generate.prompt=import os')
  assert out.startswith('import os')


def test_eval_without_checkpoint_is_one_clear_error(tmp_path, stdlib_data_dir):
  err = _run(tmp_path / 'empty', stdlib_data_dir, 2, '--mode=eval', expect_rc=1)
  assert err.strip().splitlines()[-1].startswith('effjax: error: no checkpoint under ')


def test_corrupt_checkpoint_is_one_clear_error_and_nothing_is_deleted(tmp_path, stdlib_data_dir):
  workdir = tmp_path / 'run'
  _run(workdir, stdlib_data_dir, 2, '--config.generate.at_end=False')
  rng = np.random.default_rng()
  for f in sorted((workdir / 'checkpoints' / '2' / 'state').rglob('*')):
    if f.is_file() and f.stat().st_size > 64:
      f.write_bytes(rng.integers(0, 256, 100, dtype=np.uint8).tobytes())
  before = {p: p.read_bytes() for p in (workdir / 'checkpoints').rglob('*') if p.is_file()}
  err = _run(workdir, stdlib_data_dir, 4, expect_rc=1)
  assert err.strip().splitlines()[-1].startswith(
      'effjax: error: the checkpoint at step 2 under ')
  assert 'nothing on disk was changed' in err
  after = {p: p.read_bytes() for p in (workdir / 'checkpoints').rglob('*') if p.is_file()}
  assert after == before
