"""Every notebook in notebooks/ runs top to bottom (small settings through the environment)."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / 'notebooks').glob('*.ipynb'))


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, stdlib_data_dir, monkeypatch):
  monkeypatch.setenv('EFFJAX_DATA_DIR', stdlib_data_dir)
  monkeypatch.setenv('EFFJAX_NOTEBOOK_STEPS', '12')
  monkeypatch.setenv('EFFJAX_NOTEBOOK_DOCS', '30')
  nb = nbformat.read(path, as_version=4)
  NotebookClient(nb, timeout=300, kernel_name='python3',
                 resources={'metadata': {'path': str(path.parent)}}).execute()
  errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])
            if o.get('output_type') == 'error']
  assert not errors
