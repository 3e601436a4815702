"""Linear-attention and state-space mixers: the chunked training form equals the recurrence.

For every mixer ('gla', 'retnet', 'linear_attention', 'mamba2', 'mamba1'): the layer's training
forward (the chunked form, at several chunk sizes including a ragged last chunk) equals the same
layer stepped token by token through its decode path, in outputs and in gradients with respect to
the input and every parameter; packed documents equal each document run alone; the decoding state
has the same size for any context length. Mamba-1's chunked selective scan is also checked
against a plain sequential scan. Meshes: a hybrid stack gives the same loss on 2x2x2 as on one
device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effjax.models import layers
from effjax.models import lm as lm_lib
from effjax.models import ssm
from effjax.models.registry import MIXERS
from effjax.parallel import sharding as shd
from effjax.train import step as step_lib
from tests.helpers import build, random_batch, tiny_config

KINDS = ('gla', 'retnet', 'linear_attention', 'mamba2', 'mamba1')
# norm_eps 1e-3 (the model's default is 1e-6): GLA's and RetNet's per-head output RMSNorm
# amplifies rounding by up to 1 / sqrt(eps) where a head's output is near zero (most often at a
# document's first token, whose output is one q.k product); the forms compared here agree to
# rounding either way, and the larger eps keeps that rounding from being magnified 1000x.
SMALL = dict(ssm_state_dim=8, ssm_head_dim=16, init_std=0.2, scan_backend='xla', norm_eps=1e-3)


def _mixer(kind: str, rng, **overrides):
  cfg = tiny_config(**{**SMALL, **overrides}).model
  return MIXERS.get(kind)(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))


class _Jitted:
  """A mixer's forward, prefill and decode, each one compiled program.

  The same computation as calling the module eagerly, which would compile every primitive on
  its own (about 300 small XLA compiles per test, most of the test's time on CPU)."""

  def __init__(self, mixer):
    graphdef, state = nnx.split(mixer)
    self.mixer, self._state = mixer, state
    m = lambda state: nnx.merge(graphdef, state)
    self._call = jax.jit(lambda s, x, pos, seg: m(s)(x, layers.Context(pos, seg)))
    self._prefill = jax.jit(lambda s, x, pos, seg, cache:
                            m(s).prefill(x, layers.Context(pos, seg), cache))
    self._decode = jax.jit(lambda s, x, pos, cache: m(s).decode(x, pos, cache))

  def __call__(self, x, ctx):
    return self._call(self._state, x, ctx.positions, ctx.segment_ids)

  def prefill(self, x, ctx, cache):
    return self._prefill(self._state, x, ctx.positions, ctx.segment_ids, cache)

  def decode(self, x, pos, cache):
    return self._decode(self._state, x, jnp.asarray(pos, jnp.int32), cache)

  def init_cache(self, batch, max_len):
    return self.mixer.init_cache(batch, max_len)


def _stepped(mixer, x_btd):
  """The mixer run one token at a time through decode (a lax.scan over positions)."""
  graphdef, state = nnx.split(mixer)

  def run(state, x_btd):
    m = nnx.merge(graphdef, state)
    cache = m.init_cache(x_btd.shape[0], x_btd.shape[1])

    def step(cache, xs):
      x_b1d, pos = xs
      y, cache = m.decode(x_b1d[:, None], pos, cache)
      return cache, y[:, 0]

    _, ys = jax.lax.scan(step, cache, (jnp.moveaxis(x_btd, 1, 0), jnp.arange(x_btd.shape[1])))
    return jnp.moveaxis(ys, 0, 1)
  return jax.jit(run)(state, x_btd)


def _ctx(b, t, segment_ids=None, positions=None):
  positions = jnp.broadcast_to(jnp.arange(t), (b, t)) if positions is None else positions
  return layers.Context(positions=positions, segment_ids=segment_ids)


def _grads(fn, mixer, x, ct):
  graphdef, state = nnx.split(mixer)
  loss = lambda state, x: jnp.sum(fn(nnx.merge(graphdef, state), x) * ct)
  return jax.jit(jax.grad(loss, argnums=(0, 1)))(state, x)


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('chunk', [4, 8])
def test_chunked_form_equals_token_by_token_recurrence(kind, chunk):
  """T = 13: chunks of 4 and 8 leave a ragged last chunk; outputs and all gradients agree."""
  rng = np.random.default_rng()
  mixer = _mixer(kind, rng, scan_chunk=chunk)
  b, t = 2, 13
  x = jnp.asarray(rng.standard_normal((b, t, 64)), jnp.float32)
  ct = jnp.asarray(rng.standard_normal((b, t, 64)), jnp.float32)
  full = lambda m, x: m(x, _ctx(b, t))
  # Float32 sums in two orders: seen up to 3e-5 of the largest entry apart (at a document's first
  # token, before the eps above); a wrong decay or mask is off by O(1).
  y_ref = _stepped(mixer, x)
  np.testing.assert_allclose(_Jitted(mixer)(x, _ctx(b, t)), y_ref, rtol=2e-4,
                             atol=1e-4 * float(jnp.max(jnp.abs(y_ref))))
  (g_params, g_x), (s_params, s_x) = _grads(full, mixer, x, ct), _grads(_stepped, mixer, x, ct)
  np.testing.assert_allclose(g_x, s_x, rtol=1e-3, atol=1e-4 * float(jnp.max(jnp.abs(s_x))))
  for (path, a), (_, b_) in zip(jax.tree_util.tree_leaves_with_path(g_params),
                                jax.tree_util.tree_leaves_with_path(s_params)):
    tol = 1e-4 * float(jnp.max(jnp.abs(b_)) + 1e-6)
    np.testing.assert_allclose(a, b_, rtol=1e-3, atol=tol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('kind', KINDS)
def test_packed_documents_equal_documents_run_alone(kind):
  rng = np.random.default_rng()
  mixer = _Jitted(_mixer(kind, rng, scan_chunk=4))
  lengths = (5, 9, 4)
  t = sum(lengths)
  x = jnp.asarray(rng.standard_normal((1, t, 64)), jnp.float32)
  seg = jnp.asarray([np.repeat(np.arange(1, 4), lengths)], jnp.int32)
  pos = jnp.asarray([np.concatenate([np.arange(n) for n in lengths])], jnp.int32)
  packed = mixer(x, _ctx(1, t, seg, pos))
  start = 0
  for n in lengths:
    alone = mixer(x[:, start:start + n], _ctx(1, n))
    np.testing.assert_allclose(packed[:, start:start + n], alone, rtol=1e-4, atol=1e-5)
    start += n


@pytest.mark.parametrize('kind', KINDS)
def test_decoding_state_does_not_grow_with_the_context(kind):
  rng = np.random.default_rng()
  mixer = _Jitted(_mixer(kind, rng))
  shapes = {max_len: jax.tree.map(lambda a: a.shape, mixer.init_cache(2, max_len))
            for max_len in (8, 1024, 1 << 20)}
  assert len({str(s) for s in shapes.values()}) == 1, shapes
  # After prefilling prompts of different lengths the cache keeps that one size.
  for t in (3, 17):
    x = jnp.asarray(rng.standard_normal((2, t, 64)), jnp.float32)
    _, cache = mixer.prefill(x, _ctx(2, t), mixer.init_cache(2, t))
    assert jax.tree.map(lambda a: a.shape, cache) == shapes[8]


@pytest.mark.parametrize('kind', KINDS)
def test_prefill_then_decode_continues_the_full_forward(kind):
  rng = np.random.default_rng()
  mixer = _Jitted(_mixer(kind, rng, scan_chunk=4))
  t, prompt = 11, 6
  x = jnp.asarray(rng.standard_normal((2, t, 64)), jnp.float32)
  full = mixer(x, _ctx(2, t))
  y, cache = mixer.prefill(x[:, :prompt], _ctx(2, prompt), mixer.init_cache(2, t))
  outs = [y]
  for pos in range(prompt, t):
    y, cache = mixer.decode(x[:, pos:pos + 1], pos, cache)
    outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-4, atol=1e-5)


def _sequential_selective_scan(dt, a, x, b, c):
  def step(h, xs):
    dt_t, x_t, b_t, c_t = xs
    h = jnp.exp(dt_t[..., None] * a) * h + (dt_t * x_t)[..., None] * b_t[:, None]
    return h, jnp.einsum('ben,bn->be', h, c_t)
  h0 = jnp.zeros(x.shape[:1] + a.shape, jnp.float32)
  h, y = jax.lax.scan(step, h0, tuple(jnp.moveaxis(z, 1, 0) for z in (dt, x, b, c)))
  return jnp.moveaxis(y, 0, 1), h


@pytest.mark.parametrize('chunk', [1, 5, 16])
def test_selective_scan_chunks_equal_the_sequential_scan(chunk):
  rng = np.random.default_rng()
  bsz, t, e, n = 2, 23, 6, 4
  dt = jnp.asarray(rng.uniform(0.01, 0.5, (bsz, t, e)), jnp.float32)
  a = -jnp.asarray(rng.uniform(0.5, 4.0, (e, n)), jnp.float32)
  x, = (jnp.asarray(rng.standard_normal((bsz, t, e)), jnp.float32),)
  b, c = (jnp.asarray(rng.standard_normal((bsz, t, n)), jnp.float32) for _ in range(2))
  y, h = ssm.selective_scan(dt, a, x, b, c, chunk=chunk)
  y_ref, h_ref = _sequential_selective_scan(dt, a, x, b, c)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-5)
  ct = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  grads = jax.grad(lambda *z: jnp.sum(ssm.selective_scan(*z, chunk=chunk)[0] * ct),
                   argnums=range(5))(dt, a, x, b, c)
  ref = jax.grad(lambda *z: jnp.sum(_sequential_selective_scan(*z)[0] * ct),
                 argnums=range(5))(dt, a, x, b, c)
  for g, r in zip(grads, ref):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(r))))


def test_causal_conv_history_and_resets():
  rng = np.random.default_rng()
  x = jnp.asarray(rng.standard_normal((1, 9, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)
  bias = jnp.asarray(rng.standard_normal((3,)), jnp.float32)
  y, history = ssm.causal_conv(x, w, bias, None)
  xn = np.asarray(x[0])
  want = [bias + sum(w[i] * xn[t - i] for i in range(4) if t - i >= 0) for t in range(9)]
  np.testing.assert_allclose(y[0], np.stack(want), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(history[0], xn[-3:])
  # One step from that history equals the next position of a longer sequence.
  x_next = jnp.asarray(rng.standard_normal((1, 3)), jnp.float32)
  step, _ = ssm.conv_step(x_next, w, bias, history)
  longer, _ = ssm.causal_conv(jnp.concatenate([x, x_next[:, None]], 1), w, bias, None)
  np.testing.assert_allclose(step, longer[:, -1], rtol=1e-5, atol=1e-5)
  # A document starting at t = 5 sees none of the tokens before it.
  seg = jnp.asarray([[1] * 5 + [2] * 4], jnp.int32)
  y_seg, _ = ssm.causal_conv(x, w, bias, seg)
  alone, _ = ssm.causal_conv(x[:, 5:], w, bias, None)
  np.testing.assert_allclose(y_seg[:, 5:], alone, rtol=1e-5, atol=1e-5)


def test_parameter_counts_match_the_built_modules():
  rng = np.random.default_rng()
  for kind in KINDS:
    mixer = _mixer(kind, rng)
    built = sum(p.size for p in jax.tree.leaves(nnx.state(mixer, nnx.Param)))
    assert MIXERS.get(kind).num_params(mixer_cfg := tiny_config(**SMALL).model) == built, kind
    flops = MIXERS.get(kind).flops_per_token
    assert flops(mixer_cfg, 4096) == flops(mixer_cfg, 1 << 16), kind  # linear in the length


def test_ssm_dynamics_are_not_weight_decayed():
  from effjax.optim.factory import weight_decay_mask
  model = lm_lib.LM(tiny_config(pattern='mamba2:mlp, mamba1:mlp', **SMALL).model,
                    rngs=nnx.Rngs(0))
  mask = weight_decay_mask(nnx.state(model, nnx.Param))
  flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
  for name in ('a_log', 'd_skip', 'dt_bias', 'conv_bias'):
    assert any(name in k for k in flat) and not any(m for k, m in flat.items() if name in k), name
  assert all(m for k, m in flat.items() if k.endswith("'w_x']"))


def test_hybrid_stack_is_the_same_on_a_2x2x2_mesh():
  config = tiny_config(pattern='gla:mlp, mamba2:mlp, retnet:mlp, mamba1:mlp', num_layers=4,
                       **SMALL)
  batch = random_batch(np.random.default_rng(), 16, 32)
  losses = {}
  for name, sizes, n in (('one', dict(data=1, fsdp=1, tensor=1), 1),
                         ('2x2x2', dict(data=2, fsdp=2, tensor=2), 8)):
    for axis, size in sizes.items():
      config.mesh[axis] = size
    mesh, rules, setup = build(config, jax.devices()[:n])
    with jax.set_mesh(mesh), shd.axis_rules(rules):
      state = setup.init(seed=5)
      train_step = step_lib.make_train_step(setup)
      losses[name] = []
      for _ in range(3):
        state, metrics = train_step(state, step_lib.device_batch(setup, batch, 1))
        losses[name].append(float(metrics['loss']))
  assert losses['one'][2] < losses['one'][0]
  # The first loss is the same forward pass on both layouts. Later ones follow Adam updates from
  # gradients that differ by rounding, and GLA/RetNet at this init are ill-conditioned: their
  # per-head output RMSNorm amplifies rounding where a head's output is near zero. Measured with
  # the default norm_eps 1e-6: a 1e-7 relative perturbation of the parameters moves RetNet's
  # logits by 1.1e-4 (attention's and Mamba-2's by 2e-5), and the two layouts' losses after an
  # update differed by up to 2e-4 relative (SMALL's larger eps damps this).
  # (the first: one forward reduced in another order, up to 6e-7 relative over 32 draws)
  np.testing.assert_allclose(losses['2x2x2'][0], losses['one'][0], rtol=1e-5)
  np.testing.assert_allclose(losses['2x2x2'], losses['one'], rtol=2e-3)


def test_pallas_backend_under_a_mesh_equals_one_device():
  """The Mosaic kernels (TPU interpret mode) run per device inside shard_map, batch and heads
  split over a 2x2x2 mesh; output and input gradient equal the plain-JAX steps on one device."""
  rng = np.random.default_rng()
  config = tiny_config(**SMALL)
  mixer = _mixer('gla', rng, scan_backend='xla')
  kernel_mixer = nnx.merge(*nnx.split(_mixer('gla', rng, scan_backend='mosaic',
                                             scan_interpret=True))[:1], nnx.state(mixer))
  b, t = 4, 20
  x = jnp.asarray(rng.standard_normal((b, t, 64)), jnp.float32)
  seg = jnp.asarray(np.sort(rng.integers(1, 3, (b, t)), axis=1), jnp.int32)
  ct = jnp.asarray(rng.standard_normal((b, t, 64)), jnp.float32)

  def out_and_grad(m):
    graphdef, state = nnx.split(m)
    f = lambda x: jnp.sum(nnx.merge(graphdef, state)(x, _ctx(b, t, seg)) * ct)
    return jax.jit(jax.value_and_grad(f))(x)

  want = out_and_grad(mixer)
  for name, size in (('data', 2), ('fsdp', 2), ('tensor', 2)):
    config.mesh[name] = size
  mesh, rules, _ = build(config)
  with jax.set_mesh(mesh), shd.axis_rules(rules):
    got = out_and_grad(kernel_mixer)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-4)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(want[1]))))


@pytest.mark.parametrize('kind', KINDS)
def test_decoding_after_a_packed_prefill_continues_only_the_last_document(kind):
  """The last document is one token long (shorter than the convolution's history): decoding on
  from it equals decoding on from that token prefilled alone."""
  rng = np.random.default_rng()
  mixer = _Jitted(_mixer(kind, rng, scan_chunk=4))
  x = jnp.asarray(rng.standard_normal((1, 12, 64)), jnp.float32)
  seg = jnp.asarray([[1] * 11 + [2]], jnp.int32)
  pos = jnp.asarray([list(range(11)) + [0]], jnp.int32)
  _, packed = mixer.prefill(x[:, :12], _ctx(1, 12, seg, pos), mixer.init_cache(1, 16))
  _, alone = mixer.prefill(x[:, 11:12], _ctx(1, 1), mixer.init_cache(1, 16))
  nxt = jnp.asarray(rng.standard_normal((1, 1, 64)), jnp.float32)
  y_packed, _ = mixer.decode(nxt, 1, packed)
  y_alone, _ = mixer.decode(nxt, 1, alone)
  np.testing.assert_allclose(y_packed, y_alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kind', KINDS)
def test_prefill_in_two_parts_equals_one_forward(kind):
  """A prefill that starts from a non-empty cache continues it exactly."""
  rng = np.random.default_rng()
  mixer = _Jitted(_mixer(kind, rng, scan_chunk=4))
  x = jnp.asarray(rng.standard_normal((2, 15, 64)), jnp.float32)
  full = mixer(x, _ctx(2, 15))
  y1, cache = mixer.prefill(x[:, :6], _ctx(2, 6), mixer.init_cache(2, 15))
  y2, _ = mixer.prefill(x[:, 6:], _ctx(2, 9, positions=jnp.broadcast_to(jnp.arange(6, 15), (2, 9))),
                        cache)
  np.testing.assert_allclose(jnp.concatenate([y1, y2], axis=1), full, rtol=1e-4, atol=1e-5)


def test_pure_ssm_stack_without_feed_forwards():
  config = tiny_config(pattern='mamba2:none, mamba1:none', **SMALL)
  model = lm_lib.LM(config.model, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  assert lm_lib.count_params(config.model) == sum(x.size for x in jax.tree.leaves(state))
  assert not any('ff' in jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_leaves_with_path(state))
  logits = model(jnp.zeros((1, 5), jnp.int32))
  assert logits.shape == (1, 5, 384) and bool(jnp.all(jnp.isfinite(logits)))
