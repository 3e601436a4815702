"""--mode=compile_only: memory figures from abstract shapes match the shards and a real run's step."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from effjax.parallel import sharding as shd
from effjax.train import compile_only
from effjax.train import step as step_lib
from tests import helpers

BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
_compile_events = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, seconds, **kwargs: _compile_events.append(name))


def _backend_compiles() -> int:
  return _compile_events.count(BACKEND_COMPILE_EVENT)


def _config():
  """Parameters sharded 4 ways (fsdp) and the batch 8 ways, two micro-batches per step."""
  c = helpers.tiny_config()
  c.mesh.data, c.mesh.fsdp = 2, 4
  c.train.grad_accum_steps = 2
  return c


def _shard_bytes(shape, dtype, sharding) -> int:
  return math.prod(sharding.shard_shape(tuple(shape))) * np.dtype(dtype).itemsize


def _bytes_on_device(tree, device) -> int:
  return sum(shard.data.nbytes for x in jax.tree.leaves(tree) for shard in x.addressable_shards
             if shard.device == device)


@pytest.fixture(scope='module')
def report():
  return compile_only.compile_steps(_config())


def test_argument_bytes_are_the_state_and_batch_shards(report):
  config = _config()
  _, _, setup = helpers.build(config)
  state_bytes = sum(_shard_bytes(x.shape, x.dtype, x.sharding)
                    for x in jax.tree.leaves(setup.abstract_state))
  params_bytes = sum(_shard_bytes(x.shape, x.dtype, x.sharding)
                     for x in jax.tree.leaves(setup.abstract_state['params']))
  # Five batch arrays (inputs, targets, segment ids, positions: int32; weights: float32).
  batch_size, seq_len = config.train.batch_size, config.data.seq_len
  train_batch_bytes = 5 * _shard_bytes((2, batch_size // 2, seq_len), np.int32,
                                       setup.batch_sharding)
  eval_batch_bytes = 5 * _shard_bytes((1, batch_size, seq_len), np.int32, setup.batch_sharding)

  train, evaluation = report['train_step']['memory'], report['eval_step']['memory']
  assert train['argument_bytes'] == state_bytes + train_batch_bytes
  assert train['alias_bytes'] == state_bytes  # the donated state is reused for the new one
  assert evaluation['argument_bytes'] == params_bytes + eval_batch_bytes
  assert params_bytes < state_bytes / 2  # fsdp shards: params, plus AdamW's two moments
  for m in (train, evaluation):
    assert m['total_bytes'] == (m['argument_bytes'] + m['output_bytes'] + m['temp_bytes'] -
                                m['alias_bytes'])
    assert m['temp_bytes'] > 0
  assert report['train_step']['batch_shape'] == [2, batch_size // 2, seq_len]
  assert report['eval_step']['batch_shape'] == [1, batch_size, seq_len]
  assert report['num_devices'] == 8
  assert report['mesh'] == {'data': 2, 'fsdp': 4, 'tensor': 1, 'expert': 1, 'sequence': 1}
  assert report['train_step']['xla_flops_per_device'] > 0
  assert report['train_step']['compile_seconds'] > 0


def test_matches_the_step_a_real_run_executes(report):
  config = _config()
  mesh, rules, setup = helpers.build(config)
  device = jax.devices()[0]
  with jax.set_mesh(mesh), shd.axis_rules(rules):
    train_step = step_lib.make_train_step(setup)
    state = setup.init(config.seed)
    host_batch = helpers.random_batch(np.random.default_rng(0), config.train.batch_size,
                                      config.data.seq_len)
    batch = step_lib.device_batch(setup, host_batch, config.train.grad_accum_steps)
    live_bytes = _bytes_on_device((state, batch), device)
    new_state, metrics = train_step(state, batch)
    jax.block_until_ready(new_state)
    assert int(metrics['finite']) == 1 and int(new_state['step']) == 1
    before = _backend_compiles()
    executed = train_step.lower(new_state, batch).compile()
    assert _backend_compiles() == before  # a cache hit: the executable that just ran

  measured = compile_only.memory_report(executed)
  assert report['train_step']['memory'] == measured
  assert measured['argument_bytes'] == live_bytes
  assert _bytes_on_device(new_state, device) == measured['alias_bytes']


def _main(workdir, data_dir, *overrides):
  """The command on 2 simulated devices (the suite's 8 would compile slower), as documented."""
  env = dict(os.environ, XLA_FLAGS=os.environ['XLA_FLAGS'].replace(
      'device_count=8', 'device_count=2'))
  cmd = [sys.executable, '-m', 'effjax.main', '--config=configs/default.py', '--mode=compile_only',
         f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', '--config.model.d_model=64',
         '--config.model.mlp_dim=128', '--config.model.num_layers=2', '--config.data.seq_len=32',
         '--config.mesh.fsdp=2', *overrides]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def test_main_prints_and_writes_the_report_and_nothing_else(tmp_path):
  workdir, data_dir = tmp_path / 'run', tmp_path / 'data'
  proc = _main(workdir, data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "mesh {'data': 1, 'fsdp': 2, 'tensor': 1, 'expert': 1, 'sequence': 1} on 2 cpu" in out
  assert 'train step on batch 1x8x32: lowered in ' in out and 'eval step on batch 1x8x32' in out
  assert out.count('per-device memory (GB): arguments ') == 2
  assert out.count('= arguments + outputs + temporaries - aliased') == 2
  assert 'FLOPs per step: XLA ' in out
  assert sorted(p.name for p in workdir.iterdir()) == ['compile_only.json']  # no checkpoints
  assert not data_dir.exists()  # no data read
  saved = json.loads((workdir / 'compile_only.json').read_text())
  assert saved['num_devices'] == 2 and saved['config']['model']['d_model'] == 64
  memory = saved['train_step']['memory']
  assert f'per-device total: {memory["total_bytes"] / 1e9:.4g} GB' in out
  assert memory['argument_bytes'] > 0 and memory['temp_bytes'] > 0


def test_main_config_error_is_one_line(tmp_path):
  proc = _main(tmp_path / 'run', tmp_path / 'data', '--config.train.grad_accum_steps=3')
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('effjax: config error: train.'), proc.stderr
  assert not (tmp_path / 'run').exists()
