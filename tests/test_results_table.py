"""README.md's results table against the committed result files (experiments/results_table.py)."""

import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load():
  spec = importlib.util.spec_from_file_location(
      'results_table', ROOT / 'experiments' / 'results_table.py')
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look the module up
  spec.loader.exec_module(module)
  return module


rt = _load()


def test_every_referenced_file_exists():
  assert rt.missing_files() == []
  assert all(r.files for r in rt.ROWS)


def test_readme_table_is_up_to_date():
  problems = rt.check((ROOT / 'README.md').read_text())
  assert problems == [], '\n'.join(problems) + '\nrun: python experiments/results_table.py --write'


def _bench(tmp_path, name, rows):
  path = tmp_path / name
  path.write_text(json.dumps({'environment': {}, 'rows': rows}))
  return path


def test_two_gpu_scaling_on_synthetic_files(tmp_path):
  one = _bench(tmp_path, 'one.json', [{'name': 'base', 'tokens_per_second': 100.0}])
  dp = _bench(tmp_path, 'dp.json', [{'name': 'a', 'tokens_per_second': 190.0},
                                    {'name': 'b', 'tokens_per_second': 192.5},
                                    {'name': 'c', 'error': 'out of memory'}])
  fsdp = _bench(tmp_path, 'fsdp.json', [{'name': 'a', 'tokens_per_second': 181.0}])
  assert rt.two_gpu_scaling(one, dp, fsdp) == '96.2% / 90.5% of twice one GPU'


def test_bench_row_needs_exactly_one_match(tmp_path):
  path = _bench(tmp_path, 'b.json', [{'batch_size': 32, 'tokens_per_second': 95361.0,
                                      'mfu_percent': 57.43}])
  assert rt.gpt1b(path) == '95.4K tokens/s, 57.4% MFU'
  with pytest.raises(ValueError):
    rt.bench_row(path, batch_size=16)


def test_check_names_the_stale_row():
  text = (ROOT / 'README.md').read_text()
  row = rt.ROWS[2]
  stale = text.replace(row.render(ROOT), row.render(ROOT).replace('57.4% MFU', '99.9% MFU'))
  problems = rt.check(stale)
  assert len(problems) == 1 and problems[0].startswith(f'stale row: {row.what}')
  assert rt.check('no markers here')[0].startswith('README.md lacks the markers')


def test_check_reports_a_missing_file(tmp_path):
  row = rt.Row('x', 'y', 'z', ('experiments/does_not_exist.json',), rt.gpt1b)
  assert rt.check('', rows=[row]) == [
      'missing file: experiments/does_not_exist.json (row: x)']


def test_replace_region_keeps_everything_else():
  text = 'intro\n\n' + rt.BEGIN + '\nold\n' + rt.END + '\n\nlater paragraph\n'
  out = rt.replace_region(text, rt.BEGIN + '\nnew\n' + rt.END)
  assert out == 'intro\n\n' + rt.BEGIN + '\nnew\n' + rt.END + '\n\nlater paragraph\n'
