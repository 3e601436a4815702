"""The train step: accumulation equals one large batch; a non-finite step changes nothing."""

import jax
import jax.numpy as jnp
import numpy as np

from effjax.parallel import sharding as shd
from effjax.train import step as step_lib
from tests.helpers import build, comparable_updates, random_batch, tiny_config


def _one_step(config, batch, num_micro, loss_chunk_size=0, z_loss=0.0):
  """Two train steps (Adam eps as `comparable_updates` sets it); returns both steps' metrics and
  the parameters after them."""
  config = comparable_updates(config)
  config.train.grad_accum_steps = num_micro
  mesh, rules, setup = build(config)
  with jax.set_mesh(mesh), shd.axis_rules(rules):
    state = setup.init(seed=1)
    train_step = step_lib.make_train_step(setup, z_loss=z_loss, loss_chunk_size=loss_chunk_size)
    state, metrics = train_step(state, step_lib.device_batch(setup, batch, num_micro))
    state, metrics2 = train_step(state, step_lib.device_batch(setup, batch, num_micro))
    return (jax.device_get(metrics), jax.device_get(metrics2),
            jax.device_get(jax.tree.leaves(state['params'])))


def test_gradient_accumulation_equals_large_batch():
  config = tiny_config()
  config.mesh.data, config.mesh.fsdp = 4, 2  # accumulation composes with a sharded batch
  batch = random_batch(np.random.default_rng(), 32, 32)  # uneven token counts per micro-batch
  config.train.batch_size = 32
  m1, m1b, params1 = _one_step(config, batch, 1)
  m4, m4b, params4 = _one_step(config, batch, 4)
  np.testing.assert_allclose(m4['loss'], m1['loss'], rtol=1e-5)
  np.testing.assert_allclose(m4['grad_norm'], m1['grad_norm'], rtol=1e-5)
  np.testing.assert_allclose(m4b['loss'], m1b['loss'], rtol=3e-5)
  assert m4['tokens'] == m1['tokens'] == batch['weights'].sum()
  for a, b in zip(params1, params4):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_loss_step_equals_plain_step():
  """The chunked head+loss path, on a data x fsdp x tensor mesh (vocab sharded), with z-loss."""
  config = tiny_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  batch = random_batch(np.random.default_rng(), 16, 32)
  plain, plain_b, params_plain = _one_step(config, batch, 1, z_loss=1e-3)
  chunked, chunked_b, params_chunked = _one_step(config, batch, 1, loss_chunk_size=8, z_loss=1e-3)
  for key in ('loss', 'grad_norm', 'tokens'):
    np.testing.assert_allclose(chunked[key], plain[key], rtol=1e-5)
  np.testing.assert_allclose(chunked_b['loss'], plain_b['loss'], rtol=3e-5)
  for a, b in zip(params_plain, params_chunked):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_non_finite_step_leaves_state_unchanged():
  config = tiny_config()
  mesh, rules, setup = build(config)
  batch = random_batch(np.random.default_rng(), 16, 32)
  with jax.set_mesh(mesh), shd.axis_rules(rules):
    state = setup.init(seed=2)
    train_step = step_lib.make_train_step(setup)
    state, _ = train_step(state, step_lib.device_batch(setup, batch, 1))
    # Poison one weight: the loss becomes NaN and the update must not be applied.
    wq = state['params']['groups']['blocks'][0]['mixer']['wq']
    wq[...] = wq[...].at[0, 0, 0, 0].set(jnp.nan)
    before = jax.device_get(jax.tree.leaves((state['params'], state['opt_state'])))
    state, metrics = train_step(state, step_lib.device_batch(setup, batch, 1))
    after = jax.device_get(jax.tree.leaves((state['params'], state['opt_state'])))
  assert int(metrics['finite']) == 0 and not np.isfinite(float(metrics['loss']))
  assert int(state['step']) == 2  # the step counter still advances
  for a, b in zip(before, after):
    np.testing.assert_array_equal(a, b)


def test_float_norm_skips_integer_leaves_and_squares_in_float32():
  """The logged norms: a compressed model's int8 values are left out (squared in int8 they
  overflow), float16 leaves are squared in float32 (in float16 600^2 is inf)."""
  from effjax.train.step import float_norm
  rng = np.random.default_rng()
  w = rng.standard_normal((7, 5)).astype(np.float32)
  tree = {'q': jnp.asarray(rng.integers(-127, 128, (300,)), jnp.int8),
          'h': jnp.full((4,), 600.0, jnp.float16), 'w': jnp.asarray(w)}
  want = np.sqrt(4 * 600.0 ** 2 + np.sum(w.astype(np.float64) ** 2))
  np.testing.assert_allclose(float(float_norm(tree)), want, rtol=1e-6)
  assert float(float_norm({'q': tree['q']})) == 0.0
