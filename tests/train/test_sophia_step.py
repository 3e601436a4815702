"""Sophia inside the real train step: sharded equals single-device, refreshes only every k steps."""

import jax
import numpy as np
import pytest

from effjax.parallel import sharding as shd
from effjax.train import step as step_lib
from tests.helpers import build, random_batch, tiny_config


def _run(config, batches, devices=None):
  mesh, rules, setup = build(config, devices)
  with jax.set_mesh(mesh), shd.axis_rules(rules):
    state = setup.init(seed=3)
    train_step = step_lib.make_train_step(setup, **step_lib.hessian_options(config))
    metrics = []
    hessians = []
    for batch in batches:
      state, m = train_step(state, step_lib.device_batch(setup, batch, config.train.grad_accum_steps))
      metrics.append(jax.device_get(m))
      hessians.append(np.concatenate([np.ravel(x) for x in jax.device_get(
          jax.tree.leaves(_sophia_hessian(state['opt_state'])))]))
    return metrics, jax.device_get(jax.tree.leaves(state['params'])), hessians


def _sophia_hessian(opt_state):
  """The Hessian EMA inside the chained optax state (whatever the chain's nesting)."""
  found = []

  def visit(node):
    if hasattr(node, '_fields') and 'hessian' in node._fields:
      found.append(node.hessian)
    elif isinstance(node, (tuple, list)):
      for child in node:
        visit(child)
    elif isinstance(node, dict):  # optax's partition (frozen / train) of a compressed model
      for child in node.values():
        visit(child)
  visit(opt_state)
  assert len(found) == 1, opt_state
  return found[0]


@pytest.mark.parametrize('name', ['sophia_g', 'sophia_h'])
def test_sharded_equals_single_device_and_refreshes_every_k(name):
  config = tiny_config()
  config.optim.name = name
  config.optim.hessian_interval = 2
  config.optim.b1, config.optim.b2 = 0.965, 0.99
  config.optim.learning_rate = 1e-3
  rng = np.random.default_rng()
  batches = [random_batch(rng, 16, 32) for _ in range(5)]

  single_metrics, single_params, single_h = _run(config, batches, jax.devices()[:1])
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  sharded_metrics, sharded_params, sharded_h = _run(config, batches)

  # The first step sees the same parameters on both meshes: float noise only. Later steps see
  # parameters a few clipped coordinates moved apart (below), so loss and gradient norm agree to
  # a looser bound (a gradient norm 3.2e-5 apart, relative, has been seen).
  for i, (a, b) in enumerate(zip(single_metrics, sharded_metrics)):
    assert {k for k in a if k.startswith('sophia_')}, a
    for key in ('loss', 'grad_norm'):
      np.testing.assert_allclose(a[key], b[key], rtol=2e-5 if i == 0 else 3e-4)
  # Sophia's update is clipped per coordinate: where |m / (rho h)| sits near the clip bound, float
  # rounding (other reduction orders on the mesh) can move a coordinate by up to lr = 1e-3 a step.
  # So: every coordinate within 5 steps' worth of lr, and nearly all of them within float noise.
  diff = np.concatenate([np.ravel(np.abs(a - b)) for a, b in zip(single_params, sharded_params)])
  assert diff.max() <= 5 * config.optim.learning_rate, diff.max()
  assert np.mean(diff > 1e-5) < 0.01, np.mean(diff > 1e-5)
  # Entries near zero come from cancellation inside the Hessian-vector product: compare them on
  # the scale of the whole estimate, not their own. The first estimate is taken at the same
  # parameters on both meshes: every entry agrees. Later ones are taken at parameters that the
  # clipped coordinates above moved apart, so nearly all entries (not every one) agree.
  close = lambda a, b: np.isclose(a, b, rtol=1e-3, atol=1e-4 * np.max(np.abs(a)))
  np.testing.assert_allclose(single_h[0], sharded_h[0], rtol=1e-3,
                             atol=1e-4 * np.max(np.abs(single_h[0])))
  for a, b in zip(single_h[1:], sharded_h[1:]):
    assert np.mean(~close(a, b)) < 0.01, np.mean(~close(a, b))
  # refreshed at steps 0, 2, 4 (after the 1st, 3rd, 5th call); unchanged in between
  np.testing.assert_array_equal(single_h[1], single_h[0])
  np.testing.assert_array_equal(single_h[3], single_h[2])
  assert not np.array_equal(single_h[2], single_h[1])
  assert np.all(np.isfinite(single_h[-1])) and np.any(single_h[-1] != 0)


def test_sophia_composes_with_gradient_accumulation():
  config = tiny_config()
  config.optim.name = 'sophia_g'
  config.train.grad_accum_steps = 2
  batches = [random_batch(np.random.default_rng(), 16, 32) for _ in range(3)]
  metrics, params, _ = _run(config, batches)
  assert all(np.isfinite(m['loss']) and m['finite'] == 1 for m in metrics)
  assert metrics[-1]['loss'] < metrics[0]['loss'] + 1.0


def test_hessian_rows_take_the_same_rows_from_every_shard():
  config = tiny_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2  # batch over 4 shards of 4 rows
  mesh, rules, setup = build(config)
  rng = np.random.default_rng()
  host = random_batch(rng, 16, 32)
  with jax.set_mesh(mesh), shd.axis_rules(rules):
    batch = step_lib.device_batch(setup, host, 1)
    mb = jax.tree.map(lambda x: x[0], batch)
    picked = jax.jit(lambda m: step_lib.hessian_rows_of(m, 8, setup.batch_sharding))(mb)
    rows = [0, 1, 4, 5, 8, 9, 12, 13]  # the first 2 of each shard's 4
    for key in mb:
      np.testing.assert_array_equal(np.asarray(picked[key]), np.asarray(mb[key])[rows])
      assert picked[key].sharding.shard_shape(picked[key].shape)[0] == 2
    assert step_lib.hessian_rows_of(mb, 0, setup.batch_sharding) is mb
    with pytest.raises(ValueError, match='multiple of the 4 data-parallel shards'):
      step_lib.hessian_rows_of(mb, 6, setup.batch_sharding)


def test_sophia_with_a_subset_of_rows_trains_and_differs_from_all_rows():
  config = tiny_config()
  config.optim.name = 'sophia_g'
  config.optim.hessian_interval = 2
  batches = [random_batch(np.random.default_rng(), 16, 32) for _ in range(3)]
  _, _, all_rows = _run(config, batches)
  config.optim.hessian_rows = 8  # one of the two rows on each of the 8 data-parallel devices
  metrics, _, some_rows = _run(config, batches)
  assert all(np.isfinite(m['loss']) and m['finite'] == 1 for m in metrics)
  assert np.all(np.isfinite(some_rows[-1])) and not np.allclose(some_rows[-1], all_rows[-1])


def test_hessian_rows_config_error_names_the_constraint():
  from effjax.config import ConfigError, validate
  config = tiny_config()
  config.optim.name = 'sophia_g'
  config.optim.hessian_rows = 20
  with pytest.raises(ConfigError, match='optim.hessian_rows=20: must be a multiple'):
    validate(config)


def test_forward_differentiable_swaps_fused_attention_for_xla(monkeypatch):
  """cuDNN attention has no forward-mode derivative; Sophia-H traces its HVP with XLA attention."""
  from effjax.models import attention
  seen = []
  real = jax.nn.dot_product_attention

  def spy(*args, implementation=None, **kwargs):
    seen.append(implementation)
    return real(*args, implementation='xla', **kwargs)

  monkeypatch.setattr(attention.jax.nn, 'dot_product_attention', spy)
  config = tiny_config()
  mesh, rules, setup = build(config, jax.devices()[:1])
  from flax import nnx
  with jax.set_mesh(mesh), shd.axis_rules(rules):
    state = setup.init(seed=0)
    model = nnx.merge(setup.graphdef, state['params'])
    for _, module in nnx.iter_graph(model):
      if isinstance(module, attention.Attention):
        module.implementation = 'cudnn'
    x = jax.numpy.zeros((1, 8), jax.numpy.int32)
    pos = jax.numpy.arange(8)[None]
    jax.eval_shape(lambda: model(x, pos, None))
    assert set(seen) == {'cudnn'}
    seen.clear()
    with attention.forward_differentiable():
      jax.eval_shape(lambda: model(x, pos, None))
    assert set(seen) == {'xla'}


@pytest.mark.parametrize('method', ['lora', 'int8'])
@pytest.mark.parametrize('name', ['sophia_g', 'sophia_h'])
def test_sophia_trains_only_the_trainable_leaves_of_a_compressed_model(method, name):
  """LoRA adapters on a frozen base, or the float leaves around int8 weights: Sophia's Hessian
  estimate covers exactly what trains (its state has no entry for a frozen leaf), frozen leaves
  never move, and the loss goes down."""
  config = tiny_config()
  config.optim.name, config.optim.hessian_interval = name, 1
  config.compress.method = method
  config.compress.lora_rank = 4
  rng = np.random.default_rng()
  batches = [random_batch(rng, 8, 32)] * 4
  mesh, rules, setup = build(config, jax.devices()[:1])
  with jax.set_mesh(mesh), shd.axis_rules(rules):
    state = setup.init(seed=int(rng.integers(1000)))
    before = jax.device_get(state['params'])
    train_step = step_lib.make_train_step(setup, **step_lib.hessian_options(config))
    losses = []
    for batch in batches:
      state, m = train_step(state, step_lib.device_batch(setup, batch, 1))
      losses.append(float(m['loss']))
    after = jax.device_get(state['params'])
    hessian = jax.device_get(_sophia_hessian(state['opt_state']))
  from effjax.compress import training
  flags = training.trainable_flags(before, setup.trainable)
  assert 0 < sum(flags) < len(flags)
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                    jax.tree.leaves(after))]
  assert not any(m for m, f in zip(moved, flags) if not f)  # frozen leaves never move
  assert any(moved)
  h_leaves = jax.tree.leaves(hessian)
  assert len(h_leaves) == sum(flags)
  assert all(np.all(np.isfinite(h)) for h in h_leaves) and any(np.any(h != 0) for h in h_leaves)
  assert losses[-1] < losses[0]
