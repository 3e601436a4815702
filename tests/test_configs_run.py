"""Every experiment file in configs/ builds and trains two steps (with tiny overrides)."""

import importlib.util
import json
import math
import pathlib

import pytest

from effjax.config import validate
from effjax.models.registry import parse_pattern
from effjax.train import trainer

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs'
CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob('*.py') if p.name not in ('__init__.py',))


def load(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(f'config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def shrink_model(config) -> None:
  """Tiny widths and depth, keeping what the config is about: pattern, dtypes, mesh, vocabulary."""
  m = config.model
  blocks = len(parse_pattern(m.pattern))
  # Two repeats of the pattern where layers are scanned (the scan over groups is kept), one where
  # they are unrolled (each repeat would be compiled again for nothing new).
  m.num_layers = blocks * min(2 if m.scan_layers else 1, m.num_layers // blocks)
  m.num_kv_heads = 4 if m.num_kv_heads == m.num_heads else 2
  m.num_heads, m.d_model, m.head_dim, m.mlp_dim = 4, 64, 0, 128
  m.moe_expert_mlp_dim = min(m.moe_expert_mlp_dim, 64)
  if m.exit_layers:  # still an exit head, below the shrunk depth
    m.exit_layers = '1'
    if config.train.get('exit_loss_weights'):
      config.train.exit_loss_weights = ''
  config.data.seq_len = 64
  config.train.batch_size = 8
  config.train.grad_accum_steps = 1
  if config.train.loss_chunk_size:
    config.train.loss_chunk_size = 16  # still the chunked loss, in 4 chunks


@pytest.mark.parametrize('path', CONFIG_FILES, ids=lambda p: p.name)
def test_config_trains_two_steps(path, tmp_path, stdlib_data_dir):
  config = load(path)
  validate(config)  # as written, on this machine's 8 devices
  shrink_model(config)
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
