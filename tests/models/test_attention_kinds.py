"""The attention kinds: each equals dense attention under its explicit mask; mixed patterns train;
FLOPs count computed tiles; the kernel path under a mesh equals one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effjax.config import ConfigError, validate
from effjax.kernels import flash_attention as fa
from effjax.models import attention as attn
from effjax.models import layers
from effjax.models import lm as lm_lib
from effjax.models.registry import MIXERS
from effjax.models.rope import apply_rope
from effjax.parallel import mesh as mesh_lib
from effjax.parallel import sharding as shd
from effjax.train import flops as flops_lib
from effjax.train import step as step_lib
from tests.helpers import build, random_batch, tiny_config

SPARSE = dict(attention_window=6, block_sparse_block=4, block_sparse_local_blocks=2,
              block_sparse_global_blocks=1, block_sparse_random_blocks=1)


def _seed(rng) -> int:
  return int(rng.integers(1 << 30))


def _explicit_mask(kind: str, cfg, seg_bs: np.ndarray) -> np.ndarray:
  """[B, 1, S, S] bool, built token by token from the kind's rules."""
  s = seg_bs.shape[1]
  i, j = np.arange(s)[:, None], np.arange(s)[None, :]
  allowed = j <= i
  if kind == 'sliding_window':
    allowed &= i - cfg.attention_window < j
  if kind == 'block_sparse':
    blocks = fa.bigbird_layout(s, cfg.block_sparse_block,
                               local_blocks=cfg.block_sparse_local_blocks,
                               global_blocks=cfg.block_sparse_global_blocks,
                               random_blocks=cfg.block_sparse_random_blocks,
                               seed=cfg.block_sparse_seed).array()
    allowed &= blocks[i // cfg.block_sparse_block, j // cfg.block_sparse_block]
  same = (seg_bs[:, :, None] == seg_bs[:, None, :]) & (seg_bs[:, None, :] > 0)
  return (allowed[None] & same)[:, None]


@pytest.mark.parametrize('kind', ['dense', 'flash', 'sliding_window', 'block_sparse'])
def test_kind_equals_dense_attention_with_its_mask(kind):
  rng = np.random.default_rng()
  cfg = tiny_config(attention_backend='reference', **SPARSE).model
  mixer = MIXERS.get(kind)(cfg, rngs=nnx.Rngs(_seed(rng)))
  batch = random_batch(rng, 3, 32)
  x = jnp.asarray(rng.normal(size=(3, 32, cfg.d_model)), jnp.float32)
  pos, seg = jnp.asarray(batch['positions']), jnp.asarray(batch['segment_ids'])
  out = mixer(x, layers.Context(positions=pos, segment_ids=seg))

  q = apply_rope(jnp.einsum('btd,dnh->btnh', x, mixer.wq[...]), pos, cfg.rope_theta)
  k = apply_rope(jnp.einsum('btd,dkh->btkh', x, mixer.wk[...]), pos, cfg.rope_theta)
  v = jnp.einsum('btd,dkh->btkh', x, mixer.wv[...])
  mask = _explicit_mask(kind, cfg, batch['segment_ids'])
  dense = jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask), implementation='xla')
  expected = jnp.einsum('btnh,nhd->btd', dense, mixer.wo[...])
  real = batch['segment_ids'] > 0  # padding queries see no key: the op gives 0, dense a mean
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(expected)[real], rtol=1e-5,
                             atol=1e-5)


def test_kinds_differ_where_their_masks_do():
  """The window and the layout really remove keys (the test above would pass for plain causal)."""
  rng = np.random.default_rng()
  cfg = tiny_config(attention_backend='reference', **SPARSE).model
  x = jnp.asarray(rng.normal(size=(2, 32, cfg.d_model)), jnp.float32)
  ctx = layers.Context(positions=jnp.broadcast_to(jnp.arange(32), (2, 32)), segment_ids=None)
  seed = _seed(rng)
  outs = {kind: np.asarray(MIXERS.get(kind)(cfg, rngs=nnx.Rngs(seed))(x, ctx))
          for kind in ('attention', 'flash', 'sliding_window', 'block_sparse')}
  np.testing.assert_allclose(outs['flash'], outs['attention'], rtol=1e-5, atol=1e-5)
  w = cfg.attention_window
  np.testing.assert_allclose(outs['sliding_window'][:, :w], outs['flash'][:, :w], rtol=1e-5,
                             atol=1e-5)
  assert not np.allclose(outs['sliding_window'][:, w:], outs['flash'][:, w:], atol=1e-4)
  assert not np.allclose(outs['block_sparse'], outs['flash'], atol=1e-4)


def test_unpadded_lengths_and_forward_mode():
  """A length the tiles don't divide is padded internally; forward_differentiable allows jvp."""
  rng = np.random.default_rng()
  cfg = tiny_config(attention_backend='reference', pattern='flash:mlp, block_sparse:mlp',
                    **SPARSE).model
  model = lm_lib.LM(cfg, rngs=nnx.Rngs(_seed(rng)))
  tokens = jnp.asarray(rng.integers(3, 259, (2, 19)))
  graphdef, params = nnx.split(model)
  forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
  full = forward(params, jnp.concatenate([tokens, tokens[:, :1]], axis=1))  # 20: whole blocks
  np.testing.assert_allclose(forward(params, tokens), full[:, :19], rtol=1e-5, atol=1e-5)

  loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)
  tangent = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), params)
  with attn.forward_differentiable():
    _, jvp = jax.jit(lambda p, t: jax.jvp(loss, (p,), (t,)))(params, tangent)
  grad = jax.jit(jax.grad(loss))(params)
  pairs = list(zip(jax.tree.leaves(grad), jax.tree.leaves(tangent)))
  expected = sum(jnp.vdot(g, t) for g, t in pairs)
  # Relative to the sum of the terms' sizes, not to the sum itself: with a random tangent the
  # terms cancel, and the sum can come out near zero for a draw.
  size = sum(jnp.vdot(jnp.abs(g), jnp.abs(t)) for g, t in pairs)
  assert abs(float(jvp) - float(expected)) <= 1e-6 * float(size), (jvp, expected, size)


def test_mixed_pattern_trains():
  rng = np.random.default_rng()
  config = tiny_config(pattern='flash:mlp, sliding_window:mlp, block_sparse:mlp', num_layers=3,
                       attention_backend='reference', **SPARSE)
  config.optim.warmup_steps = 1
  batch = random_batch(rng, 16, 32)
  mesh, rules, setup = build(config, jax.devices()[:1])
  with jax.set_mesh(mesh), shd.axis_rules(rules):
    state = setup.init(seed=_seed(rng))
    train_step = step_lib.make_train_step(setup)
    losses = []
    for _ in range(4):
      state, metrics = train_step(state, step_lib.device_batch(setup, batch, 1))
      losses.append(float(metrics['loss']))
  assert all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses


def _attention_flops(kind, seq_len, **fields):
  cfg = tiny_config(d_model=512, num_heads=8, num_kv_heads=8, attention_backend='triton',
                    **fields).model
  mixer = MIXERS.get(kind)
  return mixer.flops_per_token(cfg, seq_len) - MIXERS.get('attention').flops_per_token(cfg, 0)


def test_flops_count_computed_tiles():
  # A sliding window's per-token cost is set by w, not by S.
  a = _attention_flops('sliding_window', 16384, attention_window=256)
  b = _attention_flops('sliding_window', 65536, attention_window=256)
  c = _attention_flops('sliding_window', 65536, attention_window=512)
  np.testing.assert_allclose(a, b, rtol=0.02)
  per_key = 4 * 8 * 64  # two matmuls over 8 heads of 64 per (query, key) pair
  np.testing.assert_allclose(c - b, per_key * 256, rtol=0.02)  # 256 more keys per query
  assert per_key * 256 <= b <= per_key * (256 + 128 + 64)  # w plus at most a tile per side
  dense = _attention_flops('attention', 65536)
  assert b < dense / 50
  # Full causal flash counts the lower triangle plus the diagonal tiles it computes in full.
  flash = _attention_flops('flash', 4096)
  assert 1.0 <= flash / _attention_flops('attention', 4096) < 1.05
  # Block-sparse: every (query, key) pair of the layout's allowed 128 x 128 blocks, no others.
  sparse = _attention_flops('block_sparse', 4096, block_sparse_block=128)
  allowed = fa.bigbird_layout(4096, 128, local_blocks=3, global_blocks=1, random_blocks=1).array()
  np.testing.assert_allclose(sparse, per_key * 128 * 128 * allowed.sum() / 4096, rtol=1e-6)
  assert sparse < flash / 3
  # And flops.py adds them up per block of the pattern.
  cfg = tiny_config(pattern='flash:mlp, sliding_window:mlp', attention_window=16).model
  total = flops_lib.forward_flops_per_token(cfg, 64)
  parts = sum(MIXERS.get(m).flops_per_token(cfg, 64) for m in ('flash', 'sliding_window'))
  assert total > parts and total < 2 * parts + 2 * cfg.d_model * cfg.vocab_size + 1e6


def test_shard_heads_equals_unsharded():
  """batch over data x fsdp and heads over tensor; kv heads left whole falls back to copies."""
  rng = np.random.default_rng()
  config = tiny_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  mesh = mesh_lib.make_mesh(config.mesh)
  q = jnp.asarray(rng.normal(size=(4, 16, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(4, 16, 2, 8)), jnp.float32) for _ in range(2))
  seg = jnp.asarray(random_batch(rng, 4, 16)['segment_ids'])
  seen = []

  def op(q, k, v, seg):
    seen.append((q.shape, k.shape))
    return fa.attention_reference(q, k, v, segment_ids=seg, window=5)

  expected = op(q, k, v, seg)
  for kv_rule in ('tensor', None):
    config.sharding_rules.act_kv_heads = kv_rule
    with jax.set_mesh(mesh), shd.axis_rules(shd.rules_from_config(config.sharding_rules)):
      out = jax.jit(lambda *a: attn.shard_heads(op, *a))(q, k, v, seg)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  assert seen[1] == ((1, 16, 2, 8), (1, 16, 1, 8))  # per device: 1 row, half the heads
  assert seen[2] == ((1, 16, 2, 8), (1, 16, 2, 8))  # kv heads repeated to the query heads

  config.mesh.data, config.mesh.fsdp, config.mesh.tensor, config.mesh.sequence = 2, 2, 1, 2
  config.sharding_rules.act_length = 'sequence'
  mesh = mesh_lib.make_mesh(config.mesh)
  with jax.set_mesh(mesh), shd.axis_rules(shd.rules_from_config(config.sharding_rules)):
    with pytest.raises(ValueError, match='act_length'):
      jax.jit(lambda *a: attn.shard_heads(op, *a))(q, k, v, seg)


def test_kernel_layer_on_a_mesh_equals_one_device():
  """A flash model with the Triton kernel (interpret mode) under data x fsdp x tensor = 2x2x2."""
  pytest.importorskip('jax.experimental.pallas.triton')
  rng = np.random.default_rng()
  config = tiny_config(pattern='flash:mlp', num_layers=1, d_model=128, head_dim=64, num_heads=2,
                       num_kv_heads=2, attention_backend='triton', attention_interpret=True)
  model = lm_lib.LM(config.model, rngs=nnx.Rngs(_seed(rng)))
  graphdef, params = nnx.split(model)
  batch = random_batch(rng, 4, 32)
  args = [jnp.asarray(batch[k]) for k in ('inputs', 'positions', 'segment_ids')]
  forward = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a))
  single = forward(params, *args)

  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  mesh = mesh_lib.make_mesh(config.mesh)
  with jax.set_mesh(mesh), shd.axis_rules(shd.rules_from_config(config.sharding_rules)):
    specs = shd.param_specs(params)
    sharded_params = jax.device_put(params, shd.named(mesh, specs))
    sharded = forward(sharded_params, *args)
  np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)
  # And the kernel itself agrees with the reference backend on the same parameters.
  real = batch['segment_ids'] > 0
  config.model.attention_backend = 'reference'
  ref_model = nnx.merge(nnx.graphdef(lm_lib.LM(config.model, rngs=nnx.Rngs(0))), params)
  np.testing.assert_allclose(np.asarray(ref_model(*args))[real], np.asarray(single)[real],
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('fields, match', [
    (dict(pattern='sliding_window:mlp', attention_window=0), r'model\.attention_window=0'),
    (dict(pattern='block_sparse:mlp', block_sparse_block=48), r'block=48: must divide'),
    (dict(pattern='block_sparse:mlp', block_sparse_local_blocks=0), r'local_blocks=0'),
    (dict(pattern='block_sparse:mlp', block_sparse_random_blocks=-1), r'random_blocks=-1'),
    (dict(pattern='flash:mlp', attention_backend='cuda'), r"attention_backend='cuda': allowed"),
    (dict(pattern='flash:mlp', attention_backend='triton', head_dim=64),
     r"'triton': needs a GPU"),
    (dict(pattern='flash:mlp', attention_backend='triton', attention_interpret=True),
     r'model\.head_dim=16: the triton attention kernel supports 64'),
])
def test_config_validation_of_the_kind_fields(fields, match):
  if 'GPU' in match and jax.default_backend() == 'gpu':
    pytest.skip('the check is for machines without a GPU')
  config = tiny_config(**fields)
  config.data.seq_len = 256
  with pytest.raises(ConfigError, match=match):
    validate(config, num_devices=8)
  # The same fields are ignored when the pattern does not use their mixer (signs and choices
  # are checked always).
  if 'cuda' not in match and '-1' not in match:
    validate(tiny_config(**{**fields, 'pattern': 'attention:mlp'}), num_devices=8)
