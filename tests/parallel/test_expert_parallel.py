"""Expert parallelism over 8 CPU devices equals one device: MoE outputs, router statistics and
gradients, and a few training steps of a model with MoE layers, on data x expert and
data x fsdp x expert meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effjax.models import layers, moe as moe_lib
from effjax.parallel import mesh as mesh_lib
from effjax.parallel import sharding as shd
from effjax.train import step as step_lib
from tests.helpers import build, comparable_updates, random_batch, tiny_config

MESHES = {
    'data2 x expert4': dict(data=2, expert=4),
    'data2 x fsdp2 x expert2': dict(data=2, fsdp=2, expert=2),
}
B, T, D = 8, 4, 16


def _config(mesh_sizes=None, **moe):
  c = tiny_config(pattern='attention:moe', d_model=D, mlp_dim=24, init_std=0.5)
  c.model.moe_num_experts = 8
  c.model.moe_top_k = 2
  for k, v in moe.items():
    setattr(c.model, f'moe_{k}', v)
  for axis, size in (mesh_sizes or {}).items():
    c.mesh[axis] = size
  return c


def _forward_and_grads(module, x, seg, cot, mesh=None, rules=None):
  """(output, statistics, gradients of sum(output * cot) + router losses), jitted."""
  graphdef, state = nnx.split(module)

  def loss(state, x):
    ctx = layers.Context(positions=jnp.zeros(x.shape[:2], jnp.int32), segment_ids=seg)
    with moe_lib.collect_stats() as sink:
      y = nnx.merge(graphdef, state)(x, ctx)
    return jnp.sum(y * cot) + sink[0]['loss'], (y, sink[0])

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  if mesh is None:
    (_, (y, stats)), grads = fn(state, x)
  else:
    with jax.set_mesh(mesh), shd.axis_rules(rules):
      (_, (y, stats)), grads = fn(state, x)
  return jax.device_get((y, stats, grads))


def _inputs(rng):
  x = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
  seg = np.ones((B, T), np.int32)
  seg[1, 2:] = 0  # padding is neither routed nor counted
  seg[5, 1:] = 2
  cot = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
  return x, jnp.asarray(seg), cot


@pytest.mark.parametrize('layout', list(MESHES))
def test_dropless_moe_equals_single_device(layout):
  rng = np.random.default_rng()
  config = _config(MESHES[layout], num_shared_experts=1, aux_loss_weight=0.5, z_loss_weight=0.5)
  module = moe_lib.MoE(config.model, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  x, seg, cot = _inputs(rng)
  y_ref, stats_ref, grads_ref = _forward_and_grads(module, x, seg, cot)
  mesh = mesh_lib.make_mesh(config.mesh)
  y, stats, grads = _forward_and_grads(module, x, seg, cot, mesh,
                                       shd.rules_from_config(config.sharding_rules))
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for k in stats_ref:
    np.testing.assert_allclose(stats[k], stats_ref[k], rtol=1e-5, atol=1e-7, err_msg=k)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('routing', ['token_choice', 'expert_choice'])
def test_capacity_routing_is_per_device_group(routing):
  """With a capacity each device routes its own tokens: equal to one device run group by group."""
  rng = np.random.default_rng()
  config = _config(MESHES['data2 x expert4'], routing=routing, capacity_factor=1.0)
  module = moe_lib.MoE(config.model, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  x, seg, cot = _inputs(rng)
  mesh = mesh_lib.make_mesh(config.mesh)
  y, stats, _ = _forward_and_grads(module, x, seg, cot, mesh,
                                   shd.rules_from_config(config.sharding_rules))
  graphdef, state = nnx.split(module)

  @jax.jit
  def forward(x, seg):
    ctx = layers.Context(positions=jnp.zeros(x.shape[:2], jnp.int32), segment_ids=seg)
    return nnx.merge(graphdef, state)(x, ctx)

  groups = 8  # data x expert: one sequence per device
  rows = B // groups
  y_ref = np.concatenate([forward(x[g * rows:(g + 1) * rows], seg[g * rows:(g + 1) * rows])
                          for g in range(groups)])
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  if routing == 'token_choice':  # capacity 1 slot per expert and device: something drops
    assert 0 < float(stats['dropped_fraction']) < 1


def test_training_steps_equal_single_device():
  batch = random_batch(np.random.default_rng(), 16, 32)

  def train(mesh_sizes, devices):
    config = tiny_config(pattern='attention:moe')
    config.model.moe_num_experts = 4
    comparable_updates(config)
    for axis, size in mesh_sizes.items():
      config.mesh[axis] = size
    mesh, rules, setup = build(config, devices)
    with jax.set_mesh(mesh), shd.axis_rules(rules):
      state = setup.init(seed=3)
      train_step = step_lib.make_train_step(setup)
      history = []
      for _ in range(2):
        state, metrics = train_step(state, step_lib.device_batch(setup, batch, 1))
        history.append(jax.device_get(metrics))
      w = state['params']['groups']['blocks'][0]['ff']['w_gate'][...]
      return history, w.sharding.shard_shape(w.shape), jax.device_get(w)

  ref, _, w_ref = train(dict(data=1), jax.devices()[:1])
  for layout, sizes in MESHES.items():
    got, shard_shape, w = train(sizes, jax.devices())
    for m_ref, m in zip(ref, got):
      for key in ('loss', 'grad_norm', 'moe_aux_loss', 'moe_z_loss', 'moe_load_max',
                  'moe_router_entropy'):
        np.testing.assert_allclose(m[key], m_ref[key], rtol=2e-5, err_msg=f'{layout}: {key}')
    np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-6, err_msg=layout)
    # w_gate [layers, experts, embed, mlp]: experts split over 'expert', embed over 'fsdp'.
    assert shard_shape == (2, 4 // sizes['expert'], 64 // sizes.get('fsdp', 1), 128), layout
