"""Benchmark result files' record of the code that ran."""

import pathlib
import shutil

from effjax.bench import results


def test_code_digest_names_the_sources_and_moves_with_them(tmp_path, monkeypatch):
  """effjax.bench.results.code_digest: stable for the same sources, different after an edit
  (computed over a copy of the package, so the checkout is untouched)."""
  package = tmp_path / 'effjax'
  shutil.copytree(pathlib.Path(results.__file__).parents[1], package,
                  ignore=shutil.ignore_patterns('__pycache__'))
  copy = package / 'bench' / 'results.py'
  monkeypatch.setattr(results, '__file__', str(copy))
  first = results.code_digest()
  assert first == results.code_digest()
  (package / 'models' / 'rope.py').write_text((package / 'models' / 'rope.py').read_text() + '\n')
  assert results.code_digest() != first
