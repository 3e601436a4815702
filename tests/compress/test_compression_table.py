"""experiments/compression/run.py --from_reports: the table of a run cut short, from the report
files it left, in the study's row order; a clear error for no reports or mixed sources."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, 'experiments', 'compression', 'run.py')


def _measured(rng):
  return {'bytes': int(rng.integers(1e6, 1e7)), 'decode_bytes': int(rng.integers(1e6, 1e7)),
          'loss': float(rng.uniform(1, 3)), 'decode_tokens_per_s': float(rng.uniform(100, 900))}


def _report(rng, method, source, finetune_steps=0, before=None):
  """A report on `source`; `before` (the source's own measurements) is shared by every report
  of one source except for its decode speed, which each report times again."""
  before = dict(before or _measured(rng), decode_tokens_per_s=float(rng.uniform(100, 900)))
  return {'method': method, 'source': source, 'out_workdir': f'/w/{method}',
          'finetune_steps': finetune_steps, 'before': before, 'after': _measured(rng),
          'device': 'some GPU'}


def _run(reports, out, *extra):
  return subprocess.run([sys.executable, SCRIPT, f'--from_reports={reports}', '--name=t',
                         f'--results={out}', *extra], capture_output=True, text=True, check=False)


def test_table_from_reports(tmp_path):
  rng = np.random.default_rng()
  source = {'workdir': '/w/source', 'step': int(rng.integers(1, 500))}
  before = _measured(rng)
  reports = {m: _report(rng, m, source, steps, before) for m, steps in
             (('int4', 0), ('int8', 0), ('2:4', 100))}
  for method, report in reports.items():
    (tmp_path / f"{method.replace(':', '_')}.report.json").write_text(json.dumps(report))
  result = _run(tmp_path, tmp_path / 'out')
  assert result.returncode == 0, result.stderr
  table = json.loads((tmp_path / 'out' / 't.json').read_text())
  rows = table['rows']
  # The study's order (int8 before int4 before 2:4), the source row first.
  assert [r['technique'].split(' ')[0] for r in rows] == ['dense', 'int8', 'int4', '2:4']
  best = max(r['before']['decode_tokens_per_s'] for r in reports.values())
  assert rows[0]['decode_tokens_per_s'] == best
  for row, method in zip(rows[1:], ('int8', 'int4', '2:4')):
    after = reports[method]['after']
    assert (row['loss'], row['bytes'], row['decode_tokens_per_s']) == (
        after['loss'], after['bytes'], after['decode_tokens_per_s'])
    assert row['finetune_steps'] == reports[method]['finetune_steps']
  assert 'lora' in table['environment']['not_run']
  assert (tmp_path / 'out' / 't.md').read_text().count('\n') == len(rows) + 2


@pytest.mark.parametrize('case', ['empty', 'mixed', 'retrained'])
def test_errors(tmp_path, case):
  """'retrained': the same source path and step, but a source trained again (its held-out loss
  differs), as on a fresh GPU machine: a different model, so not one table."""
  rng = np.random.default_rng()
  if case != 'empty':
    before = _measured(rng)
    for method, step in (('int8', 10), ('int4', 20 if case == 'mixed' else 10)):
      if case == 'retrained' and method == 'int4':
        before = dict(before, loss=before['loss'] + float(rng.uniform(1e-4, 1e-2)))
      report = _report(rng, method, {'workdir': '/w/source', 'step': step}, before=before)
      (tmp_path / f'{method}.report.json').write_text(json.dumps(report))
  result = _run(tmp_path, tmp_path / 'out')
  assert result.returncode != 0
  assert ('no <method>.report.json' if case == 'empty' else 'different source') in result.stderr
  assert not (tmp_path / 'out').exists()


TINY = ['--steps=2', '--finetune_steps=1', '--only=int8', '--name=t', '--set', 'model.d_model=32',
        '--set', 'model.num_layers=1', '--set', 'model.mlp_dim=64', '--set', 'data.seq_len=32',
        '--set', 'compress.decode_context=16', '--set', 'compress.decode_steps=4',
        '--set', 'train.eval_batches=1']


def test_resume_after_interruption_and_drop_checkpoints(tmp_path):
  """A technique directory a killed run left without report.json is removed and the technique
  rerun; --drop_checkpoints leaves only each technique's report (the source's checkpoint
  stays); with decode rounds (which reload the checkpoints) it is one clear error."""
  out = tmp_path / 'study'
  left = out / 'int8' / 'checkpoints'
  left.mkdir(parents=True)
  (left / 'partial').write_text('written before the kill')
  args = [sys.executable, SCRIPT, f'--out={out}', f'--results={tmp_path / "res"}', *TINY]
  refused = subprocess.run(args + ['--drop_checkpoints', '--decode_rounds=1'],
                           capture_output=True, text=True, check=False)
  assert refused.returncode != 0 and '--decode_rounds=0' in refused.stderr
  assert (left / 'partial').exists()
  result = subprocess.run(args + ['--drop_checkpoints', '--decode_rounds=0'],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'interrupted run' in result.stdout
  assert sorted(os.listdir(out / 'int8')) == ['compression.json', 'config.json', 'report.json',
                                              'report.md']
  report = json.loads((out / 'int8' / 'report.json').read_text())
  assert report['method'] == 'int8'
  assert os.listdir(out / 'source' / 'checkpoints')
  rows = json.loads((tmp_path / 'res' / 't.json').read_text())['rows']
  assert [r['technique'].split(' ')[0] for r in rows] == ['dense', 'int8']
  # A directory that is not a killed run's (here: a file no compress run writes) is refused
  # and left as it is.
  (out / 'int8' / 'report.json').unlink()
  (out / 'int8' / 'notes.txt').write_text('mine')
  refused = subprocess.run(args + ['--decode_rounds=0'], capture_output=True, text=True,
                           check=False)
  assert refused.returncode != 0 and 'does not look like an interrupted run' in refused.stderr
  assert (out / 'int8' / 'notes.txt').read_text() == 'mine'
  assert (out / 'int8' / 'compression.json').exists()
