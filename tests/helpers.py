"""Small shared builders for tests: a tiny config and random packed batches."""

from __future__ import annotations

import jax
import numpy as np

from configs import base
from effjax.optim.factory import make_optimizer
from effjax.parallel import mesh as mesh_lib
from effjax.parallel import sharding as shd
from effjax.train import step as step_lib


def tiny_config(**model_overrides):
  c = base.get_config()
  c.model.d_model = 64
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.mlp_dim = 128
  c.model.vocab_size = 384
  c.data.seq_len = 32
  c.train.batch_size = 16
  c.train.steps = 10
  c.optim.warmup_steps = 2
  for k, v in model_overrides.items():
    setattr(c.model, k, v)
  return c


def comparable_updates(config):
  """config with Adam's eps at 1e-3, for tests that compare parameters after AdamW steps of two
  computations that should agree (accumulation, sharding, kernels). At eps 1e-8 Adam divides a
  near-zero gradient by its own square root, so float-rounding differences between two summation
  orders become differences of a few percent of a step (one CI failure in many runs); at 1e-3
  the update is nearly linear in the gradient, so the parameters compare the gradients tightly."""
  config.optim.eps = 1e-3
  return config


def random_batch(rng: np.random.Generator, rows: int, length: int, vocab: int = 259) -> dict:
  """Random packed rows: 1-3 segments per row, trailing padding, positions restarting per segment."""
  seg = np.zeros((rows, length), np.int32)
  pos = np.zeros((rows, length), np.int32)
  for r in range(rows):
    used = int(rng.integers(length // 2, length + 1))
    cuts = np.sort(rng.choice(np.arange(1, used), size=min(2, used - 1), replace=False))
    bounds = [0, *[int(c) for c in cuts if rng.random() < 0.7], used]
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
      seg[r, a:b] = i + 1
      pos[r, a:b] = np.arange(b - a)
  inputs = rng.integers(3, vocab, (rows, length)).astype(np.int32) * (seg > 0)
  targets = rng.integers(3, vocab, (rows, length)).astype(np.int32) * (seg > 0)
  return {'inputs': inputs, 'targets': targets, 'segment_ids': seg, 'positions': pos,
          'weights': (seg > 0).astype(np.float32)}


def build(config, devices=None):
  """(mesh, rules, setup) for a config on the given devices (all 8 by default)."""
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  rules = shd.rules_from_config(config.sharding_rules)
  optimizer, schedule = make_optimizer(config.optim, config.train.steps)
  with jax.set_mesh(mesh), shd.axis_rules(rules):
    setup = step_lib.make_setup(config, optimizer, schedule, mesh)
  return mesh, rules, setup
