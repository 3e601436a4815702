"""The flash-op attention layers on the Mosaic GPU (Hopper) backend, from a CPU machine.

- lowering: the whole jitted train step of a model with flash, sliding-window and block-sparse
  layers, exported for CUDA under 8-device meshes: every layer's forward and both backward
  kernels are Mosaic GPU custom calls inside the model's shard_map;
- values (JAX >= 0.11, whose Mosaic GPU interpreter runs the kernels; `tests/jax_next.sh`): each
  layer's output and parameter gradients equal the same layer on the reference backend;
- the config refuses what the kernel cannot run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

from effjax.config import ConfigError, validate
from effjax.models import attention as attn
from effjax.models import layers
from effjax.models.registry import MIXERS
from effjax.parallel import sharding as shd
from effjax.train import step as step_lib
from tests.helpers import build, random_batch, tiny_config

_JAX = tuple(int(p) for p in jax.__version__.split('.')[:2])
KINDS = ('flash', 'sliding_window', 'block_sparse')


def _config(backend='mosaic_gpu', interpret=False, mesh_sizes=None, seq_len=256, heads=(2, 1),
            window=100):
  c = tiny_config(pattern='flash:mlp, sliding_window:mlp, block_sparse:mlp',
                  d_model=64 * heads[0], num_heads=heads[0], num_kv_heads=heads[1],
                  compute_dtype='bfloat16',
                  attention_backend=backend, attention_interpret=interpret,
                  attention_window=window,
                  block_sparse_block=128, block_sparse_local_blocks=1,
                  block_sparse_global_blocks=1, block_sparse_random_blocks=0)
  c.model.num_layers = 3
  c.data.seq_len = seq_len
  for axis, size in (mesh_sizes or {}).items():
    c.mesh[axis] = size
  return c


MESHES = {'data8': dict(data=8), 'data4 x tensor2': dict(data=4, tensor=2),
          'fsdp4 x tensor2': dict(data=1, fsdp=4, tensor=2)}


@pytest.mark.parametrize('layout', list(MESHES))
def test_train_step_lowers_for_cuda(layout):
  config = _config(mesh_sizes=MESHES[layout], heads=(4, 2))
  mesh, rules, setup = build(config, jax.devices())
  batch = {k: jax.ShapeDtypeStruct((1, 8, 256), jnp.float32 if k == 'weights' else jnp.int32,
                                   sharding=setup.batch_sharding) for k in step_lib.BATCH_KEYS}
  with jax.set_mesh(mesh), shd.axis_rules(rules):
    exported = export.export(step_lib.make_train_step(setup), platforms=['cuda'])(
        setup.abstract_state, batch)
  text = exported.mlir_module()
  # Three layers, each a forward kernel and two backward kernels (dK/dV and dQ).
  assert text.count('@mosaic_gpu') >= 9, text.count('@mosaic_gpu')
  assert 'triton' not in text


@pytest.mark.skipif(_JAX < (0, 11), reason='the Mosaic GPU interpreter runs these kernels from '
                                            'JAX 0.11 on (tests/jax_next.sh)')
@pytest.mark.parametrize('kind', KINDS)
def test_layer_equals_reference_backend(kind):
  """Output and gradients of every parameter for a random cotangent, packed documents with
  padding, on a one-device mesh (the interpreter cannot take mesh-varying operands)."""
  rng = np.random.default_rng()
  seed = int(rng.integers(1 << 30))
  s = 256
  batch = random_batch(rng, 2, s)
  ctx = layers.Context(positions=jnp.asarray(batch['positions']),
                       segment_ids=jnp.asarray(batch['segment_ids']))
  x = jnp.asarray(rng.normal(size=(2, s, 128)), jnp.bfloat16)  # the model's compute dtype
  cot = jnp.asarray(rng.normal(size=(2, s, 128)), jnp.float32)
  window = int(rng.integers(60, 200))
  results = {}
  for backend, interpret in (('mosaic_gpu', True), ('reference', False)):
    config = _config(backend, interpret, window=window)
    mixer = MIXERS.get(kind)(config.model, rngs=nnx.Rngs(seed))
    mesh, rules, _ = build(config, jax.devices()[:1])
    graph, params = nnx.split(mixer, nnx.Param)

    def loss(params, x):
      y = nnx.merge(graph, params)(x, ctx)
      return jnp.sum(y.astype(jnp.float32) * cot), y

    with jax.set_mesh(mesh), shd.axis_rules(rules):
      grads, y = jax.jit(jax.grad(loss, has_aux=True))(params, x)
    results[backend] = (np.asarray(y, np.float32), grads)
  (y, grads), (y_ref, grads_ref) = results['mosaic_gpu'], results['reference']
  # Both run in bfloat16 (the reference backend rounds its float32 attention to bf16): compare
  # relative error norms, which measure 2e-3 for the attention op itself.
  real = batch['segment_ids'] > 0
  assert _rel(y[real], y_ref[real]) < 2e-2
  for (path, a), b in zip(jax.tree.leaves_with_path(grads), jax.tree.leaves(grads_ref)):
    assert _rel(a, b) < 2e-2, jax.tree_util.keystr(path)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_op_blocks_keep_the_warpgroup_tiles():
  """Short sequences pad to 128 instead of shrinking the 128-row query tile; head dim 64's
  256-key tile is halved where it would add padding beyond that."""
  assert attn.op_blocks('mosaic_gpu', 64, 40) == (128, 128, 128)
  assert attn.op_blocks('mosaic_gpu', 128, 1000) == (1024, 128, 128)
  assert attn.op_blocks('mosaic_gpu', 256, 512, 256) == (512, 128, 64)
  assert attn.op_blocks('mosaic_gpu', 64, 1000) == (1024, 128, 256)
  assert attn.op_blocks('mosaic_gpu', 64, 300) == (384, 128, 128)
  assert attn.op_blocks('mosaic_gpu', 64, 512, 128) == (512, 128, 128)
  rng = np.random.default_rng()
  for s in rng.integers(1, 5000, 20):
    padded, block_q, block_k = attn.op_blocks('mosaic_gpu', 64, int(s))
    assert padded == -(-s // 128) * 128 and padded % block_k == 0 and block_k in (128, 256)


def test_config_refuses_what_the_kernel_cannot_run():
  config = _config()
  config.model.compute_dtype = 'float32'
  with pytest.raises(ConfigError, match="bfloat16 or float16"):
    validate(config, 8)
  config = _config()
  config.model.block_sparse_block = 64
  with pytest.raises(ConfigError, match='multiple of 128'):
    validate(config, 8)


@pytest.fixture
def on_hopper(monkeypatch):
  """'auto' resolved as on a Hopper GPU: the default backend says 'gpu', the device sm_90."""
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(attn.fa, 'hopper', lambda: True)


def test_auto_picks_mosaic_gpu_on_hopper_where_its_kernel_runs(on_hopper):
  fa, bf16 = attn.fa, jnp.bfloat16
  assert fa.resolve_backend('auto', dtype=bf16, seq_len=1024) == 'mosaic_gpu'
  assert fa.resolve_backend('auto', dtype=jnp.float16, layout_block=256) == 'mosaic_gpu'
  # Everything its kernel does not take falls back to Triton: float32, S or a layout block off
  # the 128-row query tile, other explicit tiles, an unknown dtype.
  assert fa.resolve_backend('auto', dtype=jnp.float32, seq_len=1024) == 'triton'
  assert fa.resolve_backend('auto', dtype=bf16, seq_len=1000) == 'triton'
  assert fa.resolve_backend('auto', dtype=bf16, layout_block=32) == 'triton'
  assert fa.resolve_backend('auto', dtype=bf16, block_q=64) == 'triton'
  assert fa.resolve_backend('auto', dtype=bf16, block_k=512) == 'triton'
  assert fa.resolve_backend('auto') == 'triton'
  assert fa.resolve_backend('triton', dtype=bf16) == 'triton'  # explicit names are kept


def test_auto_keeps_triton_on_other_gpus(monkeypatch):
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(attn.fa, 'hopper', lambda: False)
  assert attn.fa.resolve_backend('auto', dtype=jnp.bfloat16, seq_len=1024) == 'triton'
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  assert attn.fa.resolve_backend('auto', dtype=jnp.bfloat16) == 'mosaic'


def test_hopper_reads_the_compute_capability(monkeypatch):
  class Device:
    compute_capability = '9.0'
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(jax, 'devices', lambda: [Device()])
  assert attn.fa.hopper()
  Device.compute_capability = '8.0'
  assert not attn.fa.hopper()
  Device.compute_capability = '10.0'  # Blackwell has no wgmma
  assert not attn.fa.hopper()
  monkeypatch.setattr(jax, 'default_backend', lambda: 'cpu')
  assert not attn.fa.hopper()


def test_auto_per_layer_in_a_model(on_hopper):
  """Each layer resolves 'auto' with the model's dtype and its own layout block: the flash and
  window layers of bf16 configs/attention_kinds.py take Mosaic GPU, its 32-token BigBird layer
  Triton; float32 compute keeps every layer on Triton."""
  config = _config('auto', heads=(4, 2), mesh_sizes=MESHES['data4 x tensor2'])
  config.model.block_sparse_block = 32
  assert [attn.op_backend(config.model, k) for k in KINDS] == ['mosaic_gpu', 'mosaic_gpu',
                                                               'triton']
  mixer = MIXERS.get('flash')(config.model, rngs=nnx.Rngs(0))
  assert mixer.backend == 'mosaic_gpu'
  # FLOP accounting counts the tiles of the backend that runs: 128-row tiles at S = 100.
  assert attn.op_blocks(attn.op_backend(config.model, 'flash'), 64, 100) == (128, 128, 128)
  f32 = _config('auto')
  f32.model.compute_dtype = 'float32'
  assert {attn.op_backend(f32.model, k) for k in KINDS} == {'triton'}


@pytest.mark.skipif(_JAX >= (0, 11), reason='JAX 0.11 lowers Triton calls under a mesh only with '
                                             'a GPU present; the main suite (JAX 0.10) runs it')
def test_auto_train_step_exports_with_both_gpu_backends(on_hopper):
  config = _config('auto', heads=(4, 2), mesh_sizes=MESHES['data4 x tensor2'])
  config.model.block_sparse_block = 32
  mesh, rules, setup = build(config, jax.devices())
  batch = {k: jax.ShapeDtypeStruct((1, 8, 256), jnp.float32 if k == 'weights' else jnp.int32,
                                   sharding=setup.batch_sharding) for k in step_lib.BATCH_KEYS}
  with jax.set_mesh(mesh), shd.axis_rules(rules):
    text = export.export(step_lib.make_train_step(setup), platforms=['cuda'], disabled_checks=[
        export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')])(
            setup.abstract_state, batch).mlir_module()
  assert text.count('@mosaic_gpu') >= 6 and '__gpu$xla.gpu.triton' in text


def test_op_backends_reports_every_flash_kind_of_the_pattern(on_hopper):
  config = _config('auto')
  config.model.block_sparse_block = 64
  assert attn.op_backends(config.model) == {'flash': 'mosaic_gpu', 'sliding_window': 'mosaic_gpu',
                                            'block_sparse': 'triton'}
  config.model.pattern = 'attention:mlp, sliding_window:mlp'
  assert attn.op_backends(config.model) == {'sliding_window': 'mosaic_gpu'}
