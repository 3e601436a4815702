"""The MoE layer with the Pallas grouped-matmul kernel inside the model's own shard_map, with the
varying-axes check on (shard_map's default), as it runs on a GPU or TPU.

On a GPU the Triton kernel is called inside `jax.shard_map(check_vma=True)`; Pallas there needs
every output struct to say over which mesh axes it varies, and once refused every MoE config at
the first step while the CPU suite (ragged_dot) passed. Two checks here:

- values: the kernel in interpret mode against the ragged_dot path, layer (forward and gradients)
  and full train steps, on a one-device mesh (the single-GPU case that failed). JAX's Pallas
  interpreter itself cannot run a kernel whose operands vary over a mesh axis (it indexes them
  with the grid's loop counter, which varies over none, and its dynamic_slice refuses the mix), so
  the multi-device values are covered by test_expert_parallel with ragged_dot and by the check
  below on the real lowering;
- lowering: the whole jitted train step exported for CUDA (Triton) and for TPU (Mosaic) from
  this CPU machine on 8 devices, expert=1 and expert>1: the shard_map, the kernels' output types,
  their custom VJPs' cotangent types and the all_to_all are checked as the accelerator's compiler
  would see them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

from effjax.models import moe as moe_lib
from effjax.parallel import sharding as shd
from effjax.train import step as step_lib
from tests.helpers import build, comparable_updates, random_batch, tiny_config
from tests.parallel.test_expert_parallel import _forward_and_grads, _inputs


def _config(backend: str, interpret: bool = True, mesh_sizes=None, **moe):
  c = tiny_config(pattern='attention:moe', d_model=16, mlp_dim=24, init_std=0.5)
  c.model.moe_num_experts = 8
  c.model.moe_top_k = 2
  c.model.moe_gmm_backend = backend
  c.model.moe_gmm_interpret = interpret
  for k, v in moe.items():
    setattr(c.model, f'moe_{k}', v)
  for axis, size in (mesh_sizes or {}).items():
    c.mesh[axis] = size
  return c


@pytest.mark.parametrize('moe', [dict(num_shared_experts=1), dict(capacity_factor=1.0)],
                         ids=['dropless+shared', 'capacity'])
def test_layer_with_kernel_in_shard_map_equals_ragged_dot(moe):
  rng = np.random.default_rng()
  seed = int(rng.integers(1 << 30))
  x, seg, cot = _inputs(rng)
  results = {}
  for backend in ('triton', 'ragged_dot'):
    config = _config(backend, aux_loss_weight=0.5, z_loss_weight=0.5, **moe)
    module = moe_lib.MoE(config.model, rngs=nnx.Rngs(seed))  # same seed: same weights
    mesh, rules, _ = build(config, jax.devices()[:1])
    results[backend] = _forward_and_grads(module, x, seg, cot, mesh, rules)
  (y, stats, grads), (y_ref, stats_ref, grads_ref) = results['triton'], results['ragged_dot']
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for k in stats_ref:
    np.testing.assert_allclose(stats[k], stats_ref[k], rtol=1e-6, atol=1e-7, err_msg=k)
  flat, flat_ref = jax.tree.leaves_with_path(grads), jax.tree.leaves(grads_ref)
  assert len(flat) == len(flat_ref)
  for (path, a), b in zip(flat, flat_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def _train(config, devices, batch, steps=2):
  mesh, rules, setup = build(config, devices)
  with jax.set_mesh(mesh), shd.axis_rules(rules):
    state = setup.init(seed=5)
    train_step = step_lib.make_train_step(setup)
    history = []
    for _ in range(steps):
      state, metrics = train_step(state, step_lib.device_batch(setup, batch, 1))
      history.append(jax.device_get(metrics))
  return history, jax.device_get(state['params'])


def test_train_steps_with_kernel_equal_ragged_dot():
  batch = random_batch(np.random.default_rng(), 8, 32)
  ref, params_ref = _train(comparable_updates(_config('ragged_dot')), jax.devices()[:1], batch)
  got, params = _train(comparable_updates(_config('triton')), jax.devices()[:1], batch)
  for m_ref, m in zip(ref, got):
    for key in ('loss', 'grad_norm', 'moe_aux_loss', 'moe_z_loss', 'moe_load_max'):
      np.testing.assert_allclose(m[key], m_ref[key], rtol=2e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


MESHES = {'data8 (expert=1)': dict(data=8), 'data2 x expert4': dict(data=2, expert=4),
          'fsdp2 x expert4': dict(fsdp=2, expert=4)}
PLATFORMS = {'triton': ('cuda', '__gpu$xla.gpu.triton'), 'mosaic': ('tpu', 'tpu_custom_call')}


@pytest.mark.parametrize('backend', list(PLATFORMS))
@pytest.mark.parametrize('layout', list(MESHES))
def test_train_step_lowers_for_the_accelerator(backend, layout):
  """The jitted train step (forward, kernel VJPs, optimizer) of an MoE model exported for the
  accelerator the kernel is written for, under an 8-device mesh with the varying-axes check on."""
  d_model = 128 if backend == 'mosaic' else 64  # Mosaic tiles are multiples of 128
  config = _config(backend, interpret=False, mesh_sizes=MESHES[layout])
  config.model.d_model, config.model.mlp_dim = d_model, 2 * d_model
  config.model.num_layers = 1
  mesh, rules, setup = build(config, jax.devices())
  platform, target = PLATFORMS[backend]
  batch = {k: jax.ShapeDtypeStruct((1, 16, 32), jnp.float32 if k == 'weights' else jnp.int32,
                                   sharding=setup.batch_sharding) for k in step_lib.BATCH_KEYS}
  with jax.set_mesh(mesh), shd.axis_rules(rules):
    train_step = step_lib.make_train_step(setup)
    exported = export.export(train_step, platforms=[platform],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(target)])(
                                 setup.abstract_state, batch)
  text = exported.mlir_module()
  # Forward: 2 grouped matmuls a layer (gate and up side by side, then down); backward: 2 per
  # forward one (lhs and weight gradients).
  assert text.count(target) >= 6, text.count(target)
  if MESHES[layout].get('expert', 1) > 1:
    assert 'all_to_all' in text
