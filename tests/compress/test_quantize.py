"""Quantization: error bounds of int8 / int4 / fp8 weights, W8A8 products, QAT's straight-through
gradient."""

import copy
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.compress import quantize as q_lib
from effjax.compress import weights as w_lib

WQ = w_lib.layout_of(('layers', 'embed', 'heads', 'head_dim'))  # [L, d, n, h], contracts d
WO = w_lib.layout_of(('heads', 'head_dim', 'embed'))  # [n, h, d], contracts n and h


def _w(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * 0.05


def test_layouts():
  assert (WQ.batch, WQ.inputs, WQ.outputs) == (1, 1, 2)
  assert (WO.batch, WO.inputs, WO.outputs) == (0, 2, 1)
  assert WQ.axes('inputs', 3) == (0,)  # inside the layer scan the 'layers' axis is gone


def test_int8_per_channel_error_at_most_half_a_step():
  w = _w((2, 64, 4, 16))
  qvalue, scale = q_lib.quantize_weight(w, WQ, 'int8')
  assert qvalue.dtype == jnp.int8 and scale.shape == (2, 1, 4, 16)  # per layer and output
  deq = q_lib.dequantize(q_lib.as_qarray(qvalue, scale, 'int8'))
  err = jnp.abs(deq - w)
  assert bool(jnp.all(err <= scale / 2 * (1 + 1e-4)))  # float32 rounding aside
  # qwix's scale: the channel's absmax over the input axis / 127.5 (the extremes round to 127).
  np.testing.assert_allclose(scale[:, 0], jnp.max(jnp.abs(w), axis=1) / 127.5, rtol=1e-6)


def test_int4_groups_error_and_packing():
  w = _w((4, 16, 32), seed=1)  # wo-like [n, h, d]; groups of 8 along head_dim
  qvalue, scale = q_lib.quantize_weight(w, WO, 'int4', group=8)
  assert qvalue.dtype == jnp.uint8 and qvalue.shape == (4, 8, 32)  # two values a byte
  assert scale.shape == (4, 2, 32)  # 16 / 8 groups per output channel
  qarr = q_lib.as_qarray(qvalue, scale, 'int4', WO)
  assert int(jnp.min(qarr.qvalue)) >= -8 and int(jnp.max(qarr.qvalue)) <= 7
  err = jnp.abs(q_lib.dequantize(qarr) - w)
  bound = jnp.repeat(scale, 8, axis=1) / 2
  assert bool(jnp.all(err <= bound * (1 + 1e-4)))
  values = jax.random.randint(jax.random.key(2), (3, 6, 5), -8, 8).astype(jnp.int8)
  np.testing.assert_array_equal(q_lib.unpack_int4(q_lib.pack_int4(values, 1), 1), values)
  with pytest.raises(ValueError, match='int4_group_size=5'):
    q_lib.quantize_weight(w, WO, 'int4', group=5)


def test_fp8_relative_error():
  w = _w((64, 32), seed=3)
  layout = w_lib.layout_of(('embed', 'mlp'))
  qvalue, scale = q_lib.quantize_weight(w, layout, 'fp8')
  assert qvalue.dtype == jnp.uint8  # the e4m3 bit pattern
  deq = q_lib.dequantize(q_lib.as_qarray(qvalue, scale, 'fp8'))
  # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values.
  big = jnp.abs(w) > 0.05 * jnp.max(jnp.abs(w), axis=0)
  rel = jnp.abs(deq - w) / jnp.abs(w)
  assert float(jnp.max(jnp.where(big, rel, 0))) <= 2 ** -4 + 1e-6


def test_quantized_weight_products():
  w = _w((64, 4, 16), seed=4)
  x = jax.random.normal(jax.random.key(5), (2, 3, 64))
  layout = w_lib.layout_of(('embed', 'heads', 'head_dim'))
  qvalue, scale = q_lib.quantize_weight(w, layout, 'int8')
  p = lambda v, names: w_lib._param(v, names)
  names = layout.names
  weight = w_lib.QuantizedWeight(p(qvalue, names), p(scale, names), layout, 'int8')
  ref = jnp.einsum('btd,dnh->btnh', x, weight[...])
  np.testing.assert_allclose(weight.einsum('btd,dnh->btnh', x, jnp.float32), ref, rtol=1e-5,
                             atol=1e-5)
  act = p(q_lib.static_scale(jnp.max(jnp.abs(x))), ())
  w8a8 = w_lib.QuantizedWeight(p(qvalue, names), p(scale, names), layout, 'w8a8', act)
  y = w8a8.einsum('btd,dnh->btnh', x, jnp.float32)
  exact = jnp.einsum('btd,dnh->btnh', x, w)
  assert float(jnp.max(jnp.abs(y - exact))) < 0.02 * float(jnp.max(jnp.abs(exact)))
  jaxpr = str(jax.make_jaxpr(lambda x: w8a8.einsum('btd,dnh->btnh', x, jnp.float32))(x))
  assert 'preferred_element_type=int32' in jaxpr  # an int8 x int8 product


def test_qat_straight_through_gradient():
  layout = w_lib.layout_of(('embed', 'mlp'))
  w = _w((32, 16), seed=6)
  c = jax.random.normal(jax.random.key(7), w.shape)
  fq = lambda w: q_lib.fake_quant(w, layout, 'int8')
  qvalue, scale = q_lib.quantize_weight(w, layout, 'int8')
  np.testing.assert_allclose(fq(w), q_lib.dequantize(q_lib.as_qarray(qvalue, scale, 'int8')),
                             rtol=1e-6, atol=1e-7)
  grad = jax.grad(lambda w: jnp.sum(c * fq(w)))(w)
  np.testing.assert_array_equal(grad, c)  # the identity's gradient, every entry in range
  grad4 = jax.grad(lambda w: jnp.sum(c * q_lib.fake_quant(w, layout, 'int4', 8)))(w)
  np.testing.assert_array_equal(grad4, c)


@pytest.mark.parametrize('kind', ['int8', 'int4'])
def test_weight_only_products_go_through_the_quantized_matmul(kind):
  """wq-like (two output axes) and wo-like (two input axes) projections: the product through
  effjax.kernels.quantized_matmul ('auto', which is XLA here, and the Triton kernel in interpret
  mode) equals the qwix einsum it replaced and the dense weight's product; an einsum of another
  form (outputs permuted) takes the qwix path and is still right."""
  rng = np.random.default_rng()
  cases = (('btd,dnh->btnh', ('embed', 'heads', 'head_dim'), (64, 4, 16), (2, 3, 64)),
           ('btnh,nhd->btd', ('heads', 'head_dim', 'embed'), (4, 32, 48), (2, 3, 4, 32)),
           ('btd,dnh->bnth', ('embed', 'heads', 'head_dim'), (64, 4, 16), (2, 3, 64)))
  for equation, names, w_shape, x_shape in cases:
    w = jnp.asarray(rng.standard_normal(w_shape) * 0.05, jnp.float32)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    layout = w_lib.layout_of(names)
    qvalue, scale = q_lib.quantize_weight(w, layout, kind, 32)
    p = lambda v: w_lib._param(v, names)
    make = lambda **kw: w_lib.QuantizedWeight(p(qvalue), p(scale), layout, kind, **kw)
    auto, kernel = make(), make(backend='triton', interpret=True)
    before = q_lib.einsum(equation, x, auto.qarray(jnp.float32))
    dense = jnp.einsum(equation, x, auto[...])
    for weight in (auto, kernel):
      y = jax.jit(lambda x, wt=weight: wt.einsum(equation, x, jnp.float32))(x)
      np.testing.assert_allclose(y, before, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(y, dense, rtol=1e-5, atol=1e-5)
    simple = equation != 'btd,dnh->bnth'
    jaxpr = str(jax.make_jaxpr(lambda x: kernel.einsum(equation, x, jnp.float32))(x))
    assert ('pallas_call' in jaxpr) == simple
    y16 = auto.einsum(equation, x.astype(jnp.bfloat16), jnp.bfloat16)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), before, rtol=2e-2,
                               atol=2e-2 * float(jnp.max(jnp.abs(before))))


def test_qmm_backend_reaches_the_weights_and_is_validated():
  from configs import base
  from effjax import config as config_lib
  from effjax.models.lm import LM
  from flax import nnx
  c = base.get_config()
  # head_dim 32: wo's int4 groups have 32 entries, the kernel's smallest
  c.model.d_model, c.model.mlp_dim, c.model.num_layers = 128, 128, 2
  c.compress.method, c.compress.int4_group_size = 'int4', 32
  c.compress.qmm_backend, c.compress.qmm_interpret = 'triton', True
  config_lib.validate(c)
  tokens = jnp.asarray(np.random.default_rng().integers(0, 256, (1, 4)), jnp.int32)
  model = LM(c.model, rngs=nnx.Rngs(0))
  w_lib.restructure(model, c)
  weights = [m for _, m in nnx.iter_modules(model) if isinstance(m, w_lib.QuantizedWeight)]
  assert weights and all(w.backend == 'triton' and w.interpret for w in weights)
  graphdef, state = nnx.split(model)
  logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
  for w in weights:
    w.backend, w.interpret = 'xla', False
  graphdef, state = nnx.split(model)
  want = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
  np.testing.assert_allclose(np.asarray(logits, np.float32), np.asarray(want, np.float32),
                             rtol=2e-2, atol=2e-2 * float(jnp.max(jnp.abs(want))))
  c.compress.qmm_interpret = False
  with pytest.raises(config_lib.ConfigError, match="compress.qmm_backend='triton': needs a GPU"):
    config_lib.validate(c)
  c.compress.qmm_backend = 'pallas'
  with pytest.raises(config_lib.ConfigError,
                     match="compress.qmm_backend='pallas': allowed values are auto, triton, xla"):
    config_lib.validate(c)


def _pallas_calls_and_logits(model, tokens):
  """(pallas_calls in the forward's jaxpr, the jitted forward's logits) of an nnx model."""
  from flax import nnx
  graphdef, state = nnx.split(model)
  fn = lambda s, t: nnx.merge(graphdef, s)(t)
  return str(jax.make_jaxpr(fn)(state, tokens)).count('pallas_call'), jax.jit(fn)(state, tokens)


def test_products_sharing_an_input_run_as_one_kernel_launch():
  """q/k/v and gate/up of an int8 model: with compress.qmm_fuse one pallas_call each (4 a layer
  with wo and down, not 7), and the same logits as a launch per weight."""
  from configs import base
  from effjax.models.lm import LM
  from flax import nnx
  c = base.get_config()
  c.model.d_model, c.model.mlp_dim, c.model.num_layers = 128, 256, 2
  c.compress.method = 'int8'
  c.compress.qmm_backend, c.compress.qmm_interpret = 'triton', True
  tokens = jnp.asarray(np.random.default_rng().integers(0, 256, (1, 4)), jnp.int32)
  model = LM(c.model, rngs=nnx.Rngs(int(np.random.default_rng().integers(1000))))
  w_lib.restructure(model, c)
  weights = [m for _, m in nnx.iter_modules(model) if isinstance(m, w_lib.QuantizedWeight)]
  assert weights and all(w.fuse for w in weights)

  fused_calls, fused = _pallas_calls_and_logits(model, tokens)
  for w in weights:
    w.fuse = False
  calls, want = _pallas_calls_and_logits(model, tokens)
  assert fused_calls * 7 == calls * 4 and fused_calls > 0
  np.testing.assert_allclose(np.asarray(fused, np.float32), np.asarray(want, np.float32),
                             rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize('kind', ['int8', 'int4'])
def test_a_single_token_takes_the_gemv_kernels_with_qmm_gemv(kind):
  """compress.qmm_gemv: a one-token forward of a quantized model runs its products through the
  GEMV kernels (q/k/v and gate/up fused as before), with the XLA path's logits."""
  from configs import base
  from effjax.models.lm import LM
  from flax import nnx
  c = base.get_config()
  c.model.d_model, c.model.mlp_dim, c.model.num_layers = 128, 256, 2
  c.compress.method, c.compress.int4_group_size = kind, 64
  c.compress.qmm_backend, c.compress.qmm_interpret, c.compress.qmm_gemv = 'triton', True, kind
  tokens = jnp.asarray(np.random.default_rng().integers(0, 256, (1, 1)), jnp.int32)
  model = LM(c.model, rngs=nnx.Rngs(int(np.random.default_rng().integers(1000))))
  w_lib.restructure(model, c)
  weights = [m for _, m in nnx.iter_modules(model) if isinstance(m, w_lib.QuantizedWeight)]
  assert weights and all(w.gemv for w in weights)
  from effjax import config as config_lib
  other = copy.deepcopy(c)
  other.compress.qmm_gemv = 'int8' if kind == 'int4' else 'int4'  # naming the other kind only
  dot_model = w_lib.restructure(LM(c.model, rngs=nnx.Rngs(0)), other)
  assert not any(m.gemv for _, m in nnx.iter_modules(dot_model)
                 if isinstance(m, w_lib.QuantizedWeight))
  with pytest.raises(config_lib.ConfigError, match="compress.qmm_gemv='int2': allowed are"):
    other.compress.qmm_gemv = 'int2'
    config_lib.validate(other)
  graphdef, state = nnx.split(model)
  jaxpr = str(jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens))
  assert f'{kind}_gemv' in jaxpr and f'{kind}_matmul' not in jaxpr  # every product a GEMV
  _, logits = _pallas_calls_and_logits(model, tokens)
  for w in weights:
    w.backend, w.interpret = 'xla', False
  _, want = _pallas_calls_and_logits(model, tokens)
  np.testing.assert_allclose(np.asarray(logits, np.float32), np.asarray(want, np.float32),
                             rtol=2e-2, atol=2e-2 * float(jnp.max(jnp.abs(want))))


def _int8_kernel_model(pattern, targets, **model_fields):
  """(a tiny int8 model of `pattern` with `targets` quantized on the kernel in interpret mode,
  its QuantizedWeights, a random prompt)."""
  from effjax.models.lm import LM
  from flax import nnx
  from tests.helpers import tiny_config
  c = tiny_config(pattern=pattern, ssm_head_dim=16, ssm_state_dim=16, **model_fields)
  c.compress.method, c.compress.targets = 'int8', targets
  c.compress.qmm_backend, c.compress.qmm_interpret = 'triton', True
  tokens = jnp.asarray(np.random.default_rng().integers(3, 259, (1, 8)), jnp.int32)
  model = LM(c.model, rngs=nnx.Rngs(int(np.random.default_rng().integers(1000))))
  w_lib.restructure(model, c)
  return model, [m for _, m in nnx.iter_modules(model) if isinstance(m, w_lib.QuantizedWeight)], \
      tokens


@pytest.mark.parametrize('pattern, targets', [
    ('gla:mlp', 'wq,wk,wv,wo,w_out_gate,w_up,w_down'),
    ('retnet:none', 'wq,wk,wv,wo,w_out_gate'),
    ('linear_attention:none', 'wq,wk,wv,wo'),
    ('mamba2:none', 'w_z,w_x,w_b,w_c,w_out'),
    ('mamba1:none', 'w_x,w_z,w_b,w_c,w_out'),
    ('attention:moe', 'shared_gate,shared_up,shared_down')])
def test_every_mixers_projections_take_the_quantized_product(pattern, targets):
  """Linear attention, state-space and MoE shared-expert projections go through the compressed
  weight's own product (the quantized-matmul kernel here, interpret mode), not a dequantized
  copy: pallas_calls in the forward, logits equal to the XLA path's."""
  model, weights, tokens = _int8_kernel_model(pattern, targets, moe_num_experts=4,
                                               moe_num_shared_experts=1)
  assert weights

  calls, got = _pallas_calls_and_logits(model, tokens)
  for w in weights:
    w.backend, w.interpret = 'xla', False
  assert calls > 0 and _pallas_calls_and_logits(model, tokens)[0] == 0
  want = _pallas_calls_and_logits(model, tokens)[1]
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=2e-3, atol=2e-3 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize('pattern, targets', [('gla:none', 'wq,wk,wv,wo,w_gate'),
                                              ('mamba1:none', 'w_x,w_dt_low,w_dt,w_out')])
def test_forced_kernel_backend_takes_xla_for_shapes_it_cannot_tile(pattern, targets, caplog):
  """compress.qmm_backend='triton' with projections too narrow for the kernel (GLA's per-head
  gate, Mamba-1's dt projections): those products take XLA, said once in the log; the others
  still reach the kernel, and the logits equal the XLA path's."""
  import logging
  model, weights, tokens = _int8_kernel_model(pattern, targets)
  narrow = [w for w in weights if w.qvalue[...].shape[-1] % 16]
  assert narrow and len(narrow) < len(weights)
  w_lib._SAID.clear()
  with caplog.at_level(logging.WARNING):
    calls, got = _pallas_calls_and_logits(model, tokens)
  assert calls > 0
  said = [r.message for r in caplog.records if 'cannot tile' in r.message]
  assert said and all("takes XLA" in m or 'runs through XLA' in m for m in said)
  for w in weights:
    w.backend, w.interpret = 'xla', False
  want = _pallas_calls_and_logits(model, tokens)[1]
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=2e-3, atol=2e-3 * float(jnp.max(jnp.abs(want))))


def test_w8a8_gradient_passes_straight_through_the_activation_rounding():
  """The int8 x int8 product's gradient to x is the dense weight's, zero where x was clipped to
  the calibrated range; a W8A8 model's float parameters (embeddings, norms) get gradients."""
  rng = np.random.default_rng()
  names = ('embed', 'heads', 'head_dim')
  layout = w_lib.layout_of(names)
  w = jnp.asarray(rng.standard_normal((64, 4, 16)) * 0.05, jnp.float32)
  x = jnp.asarray(rng.standard_normal((2, 3, 64)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((2, 3, 4, 16)), jnp.float32)
  qvalue, scale = q_lib.quantize_weight(w, layout, 'w8a8')
  p = lambda v, n: w_lib._param(v, n)
  amax = 0.7 * float(jnp.max(jnp.abs(x)))  # calibrated below the largest entries: some clip
  weight = w_lib.QuantizedWeight(p(qvalue, names), p(scale, names), layout, 'w8a8',
                                 p(q_lib.static_scale(amax), ()))
  eq = 'btd,dnh->btnh'
  dx = jax.grad(lambda x: jnp.sum(g * weight.einsum(eq, x, jnp.float32)))(x)
  dense = jax.grad(lambda x: jnp.sum(g * jnp.einsum(eq, x, weight.dense())))(x)
  inside = jnp.abs(x) <= amax
  assert 0 < int(jnp.sum(~inside)) < x.size
  np.testing.assert_allclose(dx, jnp.where(inside, dense, 0.0), rtol=1e-5, atol=1e-6)
  y = jax.jit(lambda x: weight.einsum(eq, x, jnp.float32))(x)  # the forward is unchanged
  xq = q_lib.quantize_static(x, weight.act_scale[...])
  np.testing.assert_allclose(y, q_lib.einsum(eq, xq, weight.qarray()), rtol=1e-6, atol=1e-6)

  from configs import base
  from effjax.models.lm import LM
  from flax import nnx
  c = base.get_config()
  c.model.d_model, c.model.mlp_dim, c.model.num_layers = 64, 128, 2
  c.compress.method = 'w8a8'
  model = LM(c.model, rngs=nnx.Rngs(int(rng.integers(1000))))
  w_lib.restructure(model, c, act_amax={})
  tokens = jnp.asarray(rng.integers(0, 256, (2, 8)), jnp.int32)
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params):
    logits = nnx.merge(graphdef, params)(tokens)
    return jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0])
  grads = dict((''.join(map(str, k[-2:])), v[...]) for k, v in
               nnx.to_flat_state(jax.grad(loss, allow_int=True)(params)))
  # The pre-norm scales reach the loss only through quantized products: every layer's must
  # move (the rounding's own gradient is zero almost everywhere).
  for name in ('mixer_normscale', 'ff_normscale'):
    assert float(jnp.min(jnp.max(jnp.abs(grads[name]), axis=-1))) > 0, name


@pytest.mark.parametrize('backend', ['auto', 'triton'])
def test_a_group_with_a_weight_the_kernel_cannot_tile_keeps_the_kernel_for_the_others(
    backend, monkeypatch):
  """Mamba-1's dt_low / B / C share an input; dt_low's 4 outputs are no multiple of the kernel's
  16. On a GPU (simulated: the dispatch asks jax.default_backend) under 'auto' and 'triton' B
  and C share one kernel launch and dt_low takes XLA's product, rather than all three going
  through XLA; the products equal the dense weights'."""
  from configs import base
  from effjax.models import layers
  rng = np.random.default_rng()
  c = base.get_config().compress
  c.qmm_backend, c.qmm_interpret = backend, True
  names = ('inner', None)
  # The untileable weight between the two others: the outputs come back in the products' order.
  dense = [jnp.asarray(rng.standard_normal((64, n)) * 0.1, jnp.float32) for n in (16, 4, 32)]
  weights = [w_lib.compress_param(w_lib._param(w, names), f'w{i}', 'int8', c)
             for i, w in enumerate(dense)]
  assert all(w.fuse for w in weights)
  products = list(zip(['bte,en->btn', 'bte,er->btr', 'bte,en->btn'], weights))
  x = jnp.asarray(rng.standard_normal((1, 1, 64)), jnp.float32)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  jaxpr = str(jax.make_jaxpr(lambda x: layers.matmuls(x, products, jnp.float32))(x))
  assert jaxpr.count('pallas_call') == 1
  ys = jax.jit(lambda x: layers.matmuls(x, products, jnp.float32))(x)
  for y, w in zip(ys, weights):
    np.testing.assert_allclose(y, jnp.einsum('bte,en->btn', x, w[...]), rtol=1e-5, atol=1e-5)


def test_int4_groups_too_small_for_the_dot_kernels_decode_one_row_on_the_gemv_kernels(monkeypatch):
  """int4 in groups of 16: one row (batch-1 decoding) on a GPU (simulated) takes the GEMV kernels
  as one launch for a q/k/v-like group, equal to the dense weights' products; two rows fall
  under the dot kernels' rules, whose int4 pieces need 32 entries, and take XLA's product."""
  from configs import base
  from effjax.models import layers
  rng = np.random.default_rng()
  c = base.get_config().compress
  c.qmm_interpret, c.int4_group_size, c.qmm_gemv = True, 16, 'int4'
  dense = [jnp.asarray(rng.standard_normal((64, n)) * 0.1, jnp.float32) for n in (32, 16, 16)]
  weights = [w_lib.compress_param(w_lib._param(w, ('embed', None)), f'w{i}', 'int4', c)
             for i, w in enumerate(dense)]
  products = [('bte,en->btn', w) for w in weights]
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  for rows, launches in ((1, 1), (2, 0)):
    x = jnp.asarray(rng.standard_normal((1, rows, 64)), jnp.float32)
    fn = lambda x: layers.matmuls(x, products, jnp.float32)
    jaxpr = str(jax.make_jaxpr(fn)(x))
    assert jaxpr.count('pallas_call') == launches and ('gemv' in jaxpr) == (launches > 0)
    for y, w in zip(jax.jit(fn)(x), weights):
      np.testing.assert_allclose(y, jnp.einsum('bte,en->btn', x, w[...]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kind', ['int8', 'int4'])
def test_output_major_quantized_weights_decode_one_row_on_the_output_major_kernels(kind):
  """infer.qmm_output_major: every weight-only quantized projection stored transposed. A one-token
  forward then runs each product group (q/k/v, wo, gate/up, down) as one output-major GEMV
  launch with the logits of the usual layout on XLA; a prompt of several tokens multiplies the
  transposed weights through XLA with the same logits; `w[...]` still gives the dense weight."""
  from configs import base
  from effjax.models.lm import LM
  from flax import nnx
  c = base.get_config()
  c.model.d_model, c.model.mlp_dim, c.model.num_layers = 128, 256, 2
  c.compress.method, c.compress.int4_group_size = kind, 64
  c.compress.qmm_backend, c.compress.qmm_interpret = 'triton', True
  seed = int(np.random.default_rng().integers(1000))
  model = w_lib.restructure(LM(c.model, rngs=nnx.Rngs(seed)), c)
  usual = w_lib.restructure(LM(c.model, rngs=nnx.Rngs(seed)), c)
  weights = [m for _, m in nnx.iter_modules(model) if isinstance(m, w_lib.QuantizedWeight)]
  dense = [w[...] for w in weights]
  other = 'int4' if kind == 'int8' else 'int8'
  w_lib.output_major(model, (), quantized=(other,))  # naming the other kind changes nothing
  assert not any(w.output_major for w in weights)
  with pytest.raises(ValueError, match="infer.qmm_output_major: w8a8 is no weight-only"):
    w_lib.output_major(model, (), quantized=('w8a8',))
  from effjax import config as config_lib
  bad = copy.deepcopy(c)
  bad.infer.qmm_output_major = 'int2'
  with pytest.raises(config_lib.ConfigError, match="infer.qmm_output_major='int2': allowed are"):
    config_lib.validate(bad)
  w_lib.output_major(model, (), quantized=(kind,))
  assert all(w.output_major for w in weights)
  for w, d in zip(weights, dense):
    last_input = d.shape[w.layout.batch + w.layout.inputs - 1]  # now the minor axis
    assert w.qvalue[...].shape[-1] * (2 if kind == 'int4' else 1) == last_input
    np.testing.assert_array_equal(w[...], d)
  for w in (m for _, m in nnx.iter_modules(usual) if isinstance(m, w_lib.QuantizedWeight)):
    w.backend, w.interpret = 'xla', False
  for length in (1, 3):
    tokens = jnp.asarray(np.random.default_rng().integers(0, 256, (1, length)), jnp.int32)
    graphdef, state = nnx.split(model)
    jaxpr = str(jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens))
    calls, logits = _pallas_calls_and_logits(model, tokens)
    if length == 1:
      per_body = 1 if c.model.scan_layers else c.model.num_layers  # a scanned stack traces one
      assert calls == 4 * per_body and f'{kind}_gemv_nk' in jaxpr
    else:
      assert calls == 0
    _, want = _pallas_calls_and_logits(usual, tokens)
    np.testing.assert_allclose(np.asarray(logits, np.float32), np.asarray(want, np.float32),
                               rtol=2e-2, atol=2e-2 * float(jnp.max(jnp.abs(want))))
