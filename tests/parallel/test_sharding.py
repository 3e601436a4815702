"""The same batch gives the same loss on every mesh layout; parameter shardings follow the rules."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from effjax.parallel import sharding as shd
from effjax.train import step as step_lib
from tests.helpers import build, comparable_updates, random_batch, tiny_config

MESHES = {
    '1x1x1': (dict(data=1, fsdp=1, tensor=1), 1),
    '8x1x1 data': (dict(data=8, fsdp=1, tensor=1), 8),
    '1x8x1 fsdp': (dict(data=1, fsdp=8, tensor=1), 8),
    '2x2x2': (dict(data=2, fsdp=2, tensor=2), 8),
}


def _run_two_steps(layout, batch):
  sizes, n = MESHES[layout]
  config = tiny_config()
  comparable_updates(config)
  # fsdp=8 shards the 'embed' dim (64) eight ways; the tensor axis shards heads/kv heads by 2.
  for axis, size in sizes.items():
    config.mesh[axis] = size
  mesh, rules, setup = build(config, jax.devices()[:n])
  with jax.set_mesh(mesh), shd.axis_rules(rules):
    state = setup.init(seed=3)
    train_step = step_lib.make_train_step(setup)
    losses = []
    for _ in range(3):
      state, metrics = train_step(state, step_lib.device_batch(setup, batch, 1))
      losses.append(float(metrics['loss']))
    leaf = state['params']['groups']['blocks'][0]['mixer']['wq']
    wq = leaf[...]
    return losses, wq.sharding.shard_shape(wq.shape), np.asarray(jax.device_get(wq))


def test_loss_equal_across_meshes():
  batch = random_batch(np.random.default_rng(), 16, 32)
  results = {layout: _run_two_steps(layout, batch) for layout in MESHES}
  ref_losses, _, ref_wq = results['1x1x1']
  assert ref_losses[2] < ref_losses[0]  # step 0 has learning rate 0 (warmup)
  for layout, (losses, _, wq) in results.items():
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, err_msg=layout)
    np.testing.assert_allclose(wq, ref_wq, rtol=1e-5, atol=1e-6, err_msg=layout)
  # The parameters really were laid out differently: wq is [layers, embed, heads, head_dim].
  assert results['8x1x1 data'][1] == (2, 64, 4, 16)
  assert results['1x8x1 fsdp'][1] == (2, 8, 4, 16)
  assert results['2x2x2'][1] == (2, 32, 2, 16)


# Logical rules of configs/base.py applied to the default model: parameter path -> mesh spec.
GOLDEN_DEFAULT_SPECS = {
    'embedding': P('tensor', 'fsdp'),
    'final_norm/scale': P(None),
    'groups/blocks/0/mixer_norm/scale': P(None, None),
    'groups/blocks/0/mixer/wq': P(None, 'fsdp', 'tensor', None),
    'groups/blocks/0/mixer/wk': P(None, 'fsdp', 'tensor', None),
    'groups/blocks/0/mixer/wv': P(None, 'fsdp', 'tensor', None),
    'groups/blocks/0/mixer/wo': P(None, 'tensor', None, 'fsdp'),
    'groups/blocks/0/ff_norm/scale': P(None, None),
    'groups/blocks/0/ff/w_gate': P(None, 'fsdp', 'tensor'),
    'groups/blocks/0/ff/w_up': P(None, 'fsdp', 'tensor'),
    'groups/blocks/0/ff/w_down': P(None, 'tensor', 'fsdp'),
}


def test_golden_parameter_shardings_of_default_config():
  from configs import default
  config = default.get_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  mesh, _, setup = build(config)
  params = setup.abstract_state['params']
  flat = {'/'.join(str(k.key) for k in path if hasattr(k, 'key')): leaf.sharding.spec
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert flat == GOLDEN_DEFAULT_SPECS
  # Optimizer moments are laid out like their parameters; the step counters are replicated.
  opt_leaves = jax.tree.leaves(setup.abstract_state['opt_state'])
  assert {leaf.sharding.spec for leaf in opt_leaves} >= set(GOLDEN_DEFAULT_SPECS.values())
  assert setup.abstract_state['step'].sharding.spec == P()


def test_undivisible_dimension_is_named():
  config = tiny_config(num_kv_heads=1, num_heads=4)
  config.mesh.data, config.mesh.tensor = 4, 2
  with pytest.raises(ValueError, match=r"mixer'\]\['wk'\].*not divisible by mesh axes \('tensor',\)"):
    build(config)


def test_logical_to_spec_uses_each_mesh_axis_once():
  rules = (('a', ('data', 'fsdp')), ('b', 'fsdp'), ('c', None))
  assert shd.logical_to_spec(('a', 'b', 'c'), rules) == P(('data', 'fsdp'), None, None)
  with pytest.raises(KeyError, match="'zzz' has no entry"):
    shd.logical_to_spec(('zzz',), rules)


def test_map_per_device_keeps_the_axes_that_divide():
  """Batch 2 over ('data', 'fsdp') = 2 x 2 splits over data alone; heads 3 over tensor = 2 stays
  whole; the result equals the unsharded function, in value and gradient."""
  config = tiny_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  mesh, rules, _ = build(config)
  rng = np.random.default_rng()
  x = jax.numpy.asarray(rng.standard_normal((2, 5, 3, 4)), jax.numpy.float32)
  seen = []

  def fn(x):
    seen.append(x.shape)  # the per-device block, at trace time
    return jax.numpy.sin(x) * 2.0

  names = ('act_batch', None, 'act_heads', None)
  with jax.set_mesh(mesh), shd.axis_rules(rules):
    out, grad = jax.jit(jax.value_and_grad(
        lambda x: jax.numpy.sum(shd.map_per_device(fn, (x,), (names,), names))))(x)
  assert seen[0] == (1, 5, 3, 4)
  np.testing.assert_allclose(out, float(jax.numpy.sum(jax.numpy.sin(x) * 2.0)), rtol=1e-5)
  np.testing.assert_allclose(grad, 2.0 * jax.numpy.cos(x), rtol=1e-5)
