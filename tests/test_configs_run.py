"""Every experiment file in configs/ builds and trains two steps (with tiny overrides)."""

import importlib.util
import json
import math
import pathlib

import pytest

from effjax.config import validate
from effjax.train import trainer

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs'
CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob('*.py') if p.name not in ('__init__.py',))


def load(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(f'config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize('path', CONFIG_FILES, ids=lambda p: p.name)
def test_config_trains_two_steps(path, tmp_path, stdlib_data_dir):
  config = load(path)
  validate(config)  # as written, on this machine's 8 devices
  config.data.data_dir = stdlib_data_dir
  config.data.max_documents = 40
  config.train.steps = 2
  config.train.log_every = 1
  config.train.eval_every = 0
  config.train.eval_batches = 1
  config.train.checkpoint_every = 2
  config.optim.warmup_steps = 1
  config.generate.max_new_tokens = 4
  validate(config)
  summary = trainer.train(config, str(tmp_path))
  assert summary['final_step'] == 2
  assert math.isfinite(summary['eval']['loss']) and math.isfinite(summary['train']['loss'])
  lines = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert any('train/loss' in l for l in lines) and any('eval/loss' in l for l in lines)
