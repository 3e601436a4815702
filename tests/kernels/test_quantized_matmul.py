"""Weight-only quantized matmul: the reference's storage layouts against effjax.compress's
packing and qwix's dequantization, the Triton kernel in interpret mode against the reference on
random inputs (int8 and int4, several row counts, bf16 and float32, split-K or not, shapes that
are not multiples of the default tiles), gradients, shard_map, shape errors, backend choice, and
the kernel lowered for CUDA on this CPU machine."""

import functools
import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from effjax.compress import quantize as q_lib
from effjax.compress import weights as w_lib
from effjax.kernels import quantized_matmul as qm
from effjax.kernels.quantized_matmul import (
  dequantize_int4,
  dequantize_int8,
  int4_matmul_reference,
  int8_matmul_reference,
  quantized_matmul,
)


def _weight(rng, kind: str, k: int, n: int, group: int = 64):
  """Random stored values and positive scales: (qvalue, scale, group or None)."""
  if kind == 'int8':
    q = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
    return q, jnp.asarray(rng.uniform(0.005, 0.05, (1, n)), jnp.float32), None
  packed = jnp.asarray(rng.integers(0, 256, (k // 2, n)), jnp.uint8)
  return packed, jnp.asarray(rng.uniform(0.005, 0.05, (k // group, n)), jnp.float32), group


def _reference(x, q, scale, kind, group):
  if kind == 'int8':
    return int8_matmul_reference(x, q, scale)
  return int4_matmul_reference(x, q, scale, group)


def _assert_close(got, want, dtype):
  """Relative to the output's scale: bf16 outputs carry 2^-9 rounding, float32 ones far less."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(np.max(np.abs(want))))


# ------------------------------------------------------------------------------------------------
# The reference's layouts are effjax.compress's.


def test_reference_layouts_match_compress_quantization():
  rng = np.random.default_rng()
  w = jnp.asarray(rng.standard_normal((128, 48)) * 0.05, jnp.float32)
  x = jnp.asarray(rng.standard_normal((3, 128)), jnp.float32)
  layout = w_lib.layout_of(('embed', 'mlp'))
  for kind, group in (('int8', None), ('int4', 32)):
    qvalue, scale = q_lib.quantize_weight(w, layout, kind, group or 128)
    qarr = q_lib.as_qarray(qvalue, scale, kind, layout)
    want = q_lib.dequantize(qarr)  # qwix: value * scale
    got = (dequantize_int8(qvalue, scale) if kind == 'int8'
           else dequantize_int4(qvalue, scale, group))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(_reference(x, qvalue, scale, kind, group), x @ want, rtol=1e-5,
                               atol=1e-5)
  values = jnp.asarray(rng.integers(-8, 8, (64, 16)), jnp.int8)
  packed = q_lib.pack_int4(values, 0)
  np.testing.assert_array_equal(qm.unpack_int4(packed), values)
  np.testing.assert_array_equal(qm.unpack_int4(packed), q_lib.unpack_int4(packed, 0))
  # Entry 2i is byte i's low nibble, 2i + 1 its high one.
  np.testing.assert_array_equal(np.asarray(packed) & 0xF, np.asarray(values[0::2]) & 0xF)
  np.testing.assert_array_equal(np.asarray(packed) >> 4, np.asarray(values[1::2]) & 0xF)


# ------------------------------------------------------------------------------------------------
# The kernel in interpret mode against the reference.


@pytest.mark.parametrize('kind', ['int8', 'int4'])
@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
def test_kernel_matches_reference(kind, dtype):
  """Rows 1, 3 and 16 (padded to the kernel's 16), split-K 2 and 1 (the default here)."""
  rng = np.random.default_rng()
  k, n = 256, 128
  q, scale, group = _weight(rng, kind, k, n)
  for rows, tiling in ((1, (32, 64, 2)), (3, None), (16, (64, 32, 4))):
    x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
    out = quantized_matmul(x, q, scale, kind=kind, backend='triton', interpret=True,
                           tiling=tiling)
    assert out.shape == (rows, n) and out.dtype == dtype
    _assert_close(out, _reference(x, q, scale, kind, group), dtype)


def test_kernel_leading_axes_jit_and_odd_shapes():
  """x [B, T, K] inside jit; K and N that are not multiples of the default tiles (bk 256,
  bn 128), 20 rows (padded to 32); int4 groups larger than the K step (two steps a group)."""
  rng = np.random.default_rng()
  for kind, k, n, group in (('int8', 208, 80, None), ('int4', 384, 48, 128)):
    q, scale, group = _weight(rng, kind, k, n, group or 64)
    x = jnp.asarray(rng.standard_normal((4, 5, k)), jnp.float32)
    plan = qm.plan(kind, 20, k, n, group, backend='triton')
    assert plan.tiling[0] < qm.DEFAULT_BN and k % plan.tiling[1] == 0
    tiling = (16, 64, 3) if kind == 'int4' else None
    fn = jax.jit(lambda x, q, s, t=tiling, kind=kind: quantized_matmul(
        x, q, s, kind=kind, backend='triton', interpret=True, tiling=t))
    out = fn(x, q, scale)
    assert out.shape == (4, 5, n)
    _assert_close(out, _reference(x, q, scale, kind, group), jnp.float32)


@pytest.mark.parametrize('kind', ['int8', 'int4'])
def test_xla_backend_matches_reference(kind):
  rng = np.random.default_rng()
  q, scale, group = _weight(rng, kind, 256, 96)
  for dtype in (jnp.bfloat16, jnp.float32):
    x = jnp.asarray(rng.standard_normal((2, 7, 256)), dtype)
    out = quantized_matmul(x, q, scale, kind=kind, backend='xla')
    assert out.shape == (2, 7, 96) and out.dtype == dtype
    _assert_close(out, _reference(x, q, scale, kind, group), dtype)


def test_gradients_of_the_kernel_are_the_xla_paths():
  rng = np.random.default_rng()
  q, scale, _ = _weight(rng, 'int4', 256, 64)
  x = jnp.asarray(rng.standard_normal((3, 256)), jnp.float32)
  ct = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)

  def loss(backend):
    return lambda x, s: jnp.sum(ct * quantized_matmul(x, q, s, kind='int4', backend=backend,
                                                      interpret=True, tiling=(32, 64, 2)))
  got = jax.jit(jax.grad(loss('triton'), argnums=(0, 1)))(x, scale)
  want = jax.grad(loss('xla'), argnums=(0, 1))(x, scale)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_kernel_under_shard_map():
  """Rows split over 4 devices, the weight replicated: each device runs the kernel on its rows.
  (Pallas's interpret mode needs check_vma=False; the real lowering is checked with it on in
  test_kernel_lowers_to_a_valid_triton_module.)"""
  rng = np.random.default_rng()
  q, scale, _ = _weight(rng, 'int8', 128, 64)
  x = jnp.asarray(rng.standard_normal((8, 128)), jnp.bfloat16)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ('d',))
  per_device = lambda x, s: quantized_matmul(x, q, s, kind='int8', backend='triton',
                                             interpret=True, tiling=(32, 32, 2))
  out = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P('d'), P()), out_specs=P('d'),
                              check_vma=False))(x, scale)
  _assert_close(out, int8_matmul_reference(x, q, scale), jnp.bfloat16)


# ------------------------------------------------------------------------------------------------
# Errors and the choice of backend.


@pytest.mark.parametrize('case, message', [
    ('kind', "kind must be one of ('int8', 'int4'), got 'int2'"),
    ('int8_dtype', 'int8 qvalue must be 2-D int8 [K, N], got uint8 (64, 32)'),
    ('k_mismatch', 'int8 qvalue must have K=64 rows for x [..., K=64], got shape (32, 32)'),
    ('int4_rows', 'int4 qvalue must have K/2=32 rows for x [..., K=64], got shape (64, 32)'),
    ('int8_scale', 'int8 scale must be [1, N] (one scale per output column), got shape (2, 32)'),
    ('int4_scale', 'int4 scale must be [K/group, N] with its rows dividing K=64, got shape '
                   '(3, 32)'),
    ('scale_n', 'scale must be a float [rows, N=32] array, got float32 (1, 16)'),
    ('x_dtype', 'x must be [..., K] in bfloat16, float16 or float32, got int32 (2, 64)'),
    ('backend', "backend must be one of ('auto', 'triton', 'xla'), got 'cuda'"),
    ('bad_tile', 'quantized matmul kernel: bn=24 must be a power of two >= 16'),
    ('bad_split', 'quantized matmul kernel: bk x split = 32 x 3 must divide K=64'),
    ('untileable', "backend='triton': the quantized matmul kernel cannot tile these shapes: "
                   "N=40 is not a multiple of 16; use backend='xla' or 'auto'"),
    ('small_groups', 'int4 groups of 16 entries (K=64): the dot kernel needs groups of at least '
                     '32'),
])
def test_bad_inputs_are_one_clear_error(case, message):
  rng = np.random.default_rng()
  x = jnp.asarray(rng.standard_normal((2, 64)), jnp.float32)
  q8, s8, _ = _weight(rng, 'int8', 64, 32)
  q4, s4, _ = _weight(rng, 'int4', 64, 32, group=32)
  args, kw = (x, q8, s8), dict(kind='int8')
  if case == 'kind':
    kw['kind'] = 'int2'
  elif case == 'int8_dtype':
    args = (x, jnp.zeros((64, 32), jnp.uint8), s8)
  elif case == 'k_mismatch':
    args = (x, q8[:32], s8)
  elif case == 'int4_rows':
    args, kw = (x, jnp.zeros((64, 32), jnp.uint8), s4), dict(kind='int4')
  elif case == 'int8_scale':
    args = (x, q8, jnp.ones((2, 32)))
  elif case == 'int4_scale':
    args, kw = (x, q4, jnp.ones((3, 32))), dict(kind='int4')
  elif case == 'scale_n':
    args = (x, q8, jnp.ones((1, 16)))
  elif case == 'x_dtype':
    args = (x.astype(jnp.int32), q8, s8)
  elif case == 'backend':
    kw['backend'] = 'cuda'
  elif case == 'bad_tile':
    kw.update(backend='triton', interpret=True, tiling=(24, 32, 1))
  elif case == 'bad_split':
    kw.update(backend='triton', interpret=True, tiling=(32, 32, 3))
  elif case == 'untileable':
    args = (x, q8[:, :8].repeat(5, axis=1), s8[:, :8].repeat(5, axis=1))
    kw.update(backend='triton', interpret=True)
  elif case == 'small_groups':
    args, kw = (x, q4, jnp.ones((4, 32))), dict(kind='int4', backend='triton', interpret=True)
  with pytest.raises(ValueError) as info:
    quantized_matmul(*args, **kw)
  assert message in str(info.value) and '\n' not in str(info.value)


def test_auto_backend_choice(monkeypatch):
  assert qm.resolve_backend('auto', 1) == 'xla'  # this CPU machine
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert qm.resolve_backend('auto', 1) == 'triton'
  assert qm.resolve_backend('auto', qm.MAX_KERNEL_ROWS) == 'triton'
  assert qm.resolve_backend('auto', qm.MAX_KERNEL_ROWS + 1) == 'xla'
  assert qm.plan('int8', 1, 2048, 40, backend='auto') == qm.Plan(
      'xla', reason='N=40 is not a multiple of 16')
  assert qm.plan('int4', 1, 2048, 2048, 16, backend='auto').backend == 'xla'
  assert qm.default_tiling('int8', 1, 2048, np.int64(2048)) == qm.default_tiling('int8', 1, 2048,
                                                                                 2048)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ('tensor',))
  with jax.set_mesh(mesh):  # XLA cannot partition a Pallas call: the weights would be gathered
    assert qm.resolve_backend('auto', 1) == 'xla'
  # Decode shapes of configs/gpt_1b.py: about two programs an SM, all K steps of equal length.
  for kind, k, n in (('int8', 2048, 2048), ('int8', 5632, 2048), ('int4', 2048, 5632)):
    bn, bk, split = qm.default_tiling(kind, 1, k, n, 128 if kind == 'int4' else None)
    assert n % bn == 0 and k % (bk * split) == 0
    assert (n // bn) * split <= qm.TARGET_PROGRAMS


# ------------------------------------------------------------------------------------------------
# Lowering for CUDA (what interpret mode cannot show).


@pytest.mark.parametrize('kind', ['int8', 'int4'])
@pytest.mark.parametrize('in_shard_map', [False, True])
def test_kernel_lowers_to_a_valid_triton_module(kind, in_shard_map, monkeypatch, capfd):
  """Lowered for CUDA on this CPU machine with bf16 x at decode shape (one row, broadcast to 16
  in registers, masked stores), alone and inside jax.shard_map with check_vma on (the out_struct path): the
  Triton module verifies (tests/kernels/triton_lowering.py)."""
  from effjax.kernels.quantized_matmul import gpu
  from tests.kernels.triton_lowering import assert_verified, triton_dump
  k, n = 512, 256
  q_shape = (k, n) if kind == 'int8' else (k // 2, n)
  q_dtype = jnp.int8 if kind == 'int8' else jnp.uint8
  s_rows = 1 if kind == 'int8' else k // 128
  args = (jax.ShapeDtypeStruct((1, k), jnp.bfloat16), jax.ShapeDtypeStruct(q_shape, q_dtype),
          jax.ShapeDtypeStruct((s_rows, n), jnp.float32))
  fn = lambda x, q, s: quantized_matmul(x, q, s, kind=kind, backend='triton',
                                        tiling=(128, 256, 2))
  if in_shard_map:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('d',))
    fn = jax.shard_map(fn, mesh=mesh, in_specs=(P('d'), P(), P()), out_specs=P('d'))
  dump = triton_dump(monkeypatch, capfd, gpu, fn, *args)
  assert 'scf.for %' in dump and 'tt.dot' in dump
  assert_verified(dump, 1)


# ------------------------------------------------------------------------------------------------
# Several weights sharing x in one launch (attention's q/k/v, SwiGLU's gate/up).


def _pallas_calls(fn, *args) -> int:
  return str(jax.make_jaxpr(fn)(*args)).count('pallas_call')


@pytest.mark.parametrize('kind', ['int8', 'int4'])
def test_many_weights_in_one_launch_equal_their_separate_products(kind):
  """Widths of a GQA q/k/v (128, 32, 32): one pallas_call, each output the reference's."""
  rng = np.random.default_rng()
  k = 256
  weights = [_weight(rng, kind, k, n) for n in (128, 32, 32)]
  group = weights[0][2]
  pairs = [(q, s) for q, s, _ in weights]
  for rows, tiling in ((1, None), (5, (16, 64, 2))):
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
    fn = lambda x, t=tiling: qm.quantized_matmul_many(x, pairs, kind=kind, backend='triton',
                                                      interpret=True, tiling=t)
    assert _pallas_calls(fn, x) == 1
    outs = jax.jit(fn)(x)
    for out, (q, s, _) in zip(outs, weights):
      assert out.shape == (rows, q.shape[1]) and out.dtype == x.dtype
      _assert_close(out, _reference(x, q, s, kind, group), jnp.bfloat16)
  # The plan is for the weights together: bn divides every N, programs counted over all tiles.
  bn, _, split = qm.default_tiling(kind, 1, k, (128, 32, 32), group)
  assert bn == 32 and (192 // bn) * split <= qm.TARGET_PROGRAMS


def test_gradients_of_many_weights_are_the_xla_paths():
  rng = np.random.default_rng()
  weights = [_weight(rng, 'int8', 128, n)[:2] for n in (64, 32)]
  x = jnp.asarray(rng.standard_normal((3, 128)), jnp.float32)
  cts = [jnp.asarray(rng.standard_normal((3, q.shape[1])), jnp.float32) for q, _ in weights]

  def loss(backend):
    def f(x, s0, s1):
      outs = qm.quantized_matmul_many(x, [(weights[0][0], s0), (weights[1][0], s1)],
                                      kind='int8', backend=backend, interpret=True)
      return sum(jnp.sum(c * o) for c, o in zip(cts, outs))
    return f
  args = (x, weights[0][1], weights[1][1])
  got = jax.jit(jax.grad(loss('triton'), argnums=(0, 1, 2)))(*args)
  want = jax.grad(loss('xla'), argnums=(0, 1, 2))(*args)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_many_weights_errors():
  rng = np.random.default_rng()
  x = jnp.asarray(rng.standard_normal((1, 128)), jnp.float32)
  a, b = _weight(rng, 'int4', 128, 32, group=64), _weight(rng, 'int4', 128, 32, group=32)
  with pytest.raises(ValueError, match=r'one group size, got \[32, 64\]'):
    qm.quantized_matmul_many(x, [a[:2], b[:2]], kind='int4')
  with pytest.raises(ValueError, match='at least one'):
    qm.quantized_matmul_many(x, [], kind='int8')


def test_many_weights_lower_to_a_valid_triton_module(monkeypatch, capfd):
  """The branch per weight (scf.if) in one verified Triton module, bf16 x at decode shape."""
  from effjax.kernels.quantized_matmul import gpu
  from tests.kernels.triton_lowering import assert_verified, triton_dump
  k = 512
  args = [jax.ShapeDtypeStruct((1, k), jnp.bfloat16)]
  for n in (256, 128, 128):
    args += [jax.ShapeDtypeStruct((k, n), jnp.int8), jax.ShapeDtypeStruct((1, n), jnp.float32)]
  fn = lambda x, *w: qm.quantized_matmul_many(x, list(zip(w[0::2], w[1::2])), kind='int8',
                                              backend='triton', tiling=(128, 256, 2))
  dump = triton_dump(monkeypatch, capfd, gpu, fn, *args)
  assert 'scf.if' in dump and 'tt.dot' in dump
  assert_verified(dump, 1)


@pytest.mark.parametrize('kind', ['int8', 'int4'])
def test_a_single_row_is_not_padded(kind):
  """Batch-1 decoding: x [1, K] reaches the kernel unpadded (it broadcasts the row itself), and
  the result is the reference's; two rows are padded to 16 as before."""
  rng = np.random.default_rng()
  q, scale, group = _weight(rng, kind, 256, 64)
  for rows in (1, 2):
    x = jnp.asarray(rng.standard_normal((rows, 256)), jnp.bfloat16)
    fn = lambda x: quantized_matmul(x, q, scale, kind=kind, backend='triton', interpret=True)
    jaxpr = str(jax.make_jaxpr(fn)(x))
    assert (' pad[' in jaxpr) == (rows > 1)
    _assert_close(fn(x), _reference(x, q, scale, kind, group), jnp.bfloat16)


def test_many_weights_outputs_vary_only_with_their_own_weight():
  """Inside shard_map, a replicated weight's product stays replicated beside a sharded weight's
  in the same launch (each output's varying axes are its own operands')."""
  rng = np.random.default_rng()
  k = 128
  qa, sa, _ = _weight(rng, 'int8', k, 64)
  qb, sb, _ = _weight(rng, 'int8', k, 32)
  x = jnp.asarray(rng.standard_normal((2, k)), jnp.float32)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ('m',))
  f = lambda x, qa, sa, qb, sb: tuple(qm.quantized_matmul_many(
      x, [(qa, sa), (qb, sb)], kind='int8', backend='triton', interpret=True))
  g = jax.shard_map(f, mesh=mesh, in_specs=(P(), P(None, 'm'), P(None, 'm'), P(), P()),
                    out_specs=(P(None, 'm'), P()))
  a, b = jax.eval_shape(g, x, qa, sa, qb, sb)
  assert a.shape == (2, 64) and b.shape == (2, 32)


# ------------------------------------------------------------------------------------------------
# The one-row GEMV kernels (gemv=True): elementwise products, no dot.


@pytest.mark.parametrize('kind', ['int8', 'int4'])
def test_gemv_matches_reference(kind):
  """One row, bf16 and float32 x, the default tiling and explicit ones: split-K or not, a K step
  smaller and larger than the int4 group, widths that are not multiples of the default bn."""
  rng = np.random.default_rng()
  for k, n, group, tiling in ((256, 128, 64, None), (512, 96, 128, (32, 64, 2)),
                              (256, 64, 32, (16, 128, 1)), (256, 64, 64, (64, 16, 4))):
    q, scale, group = _weight(rng, kind, k, n, group)
    plan = qm.plan(kind, 1, k, n, group, backend='triton', tiling=tiling, gemv=True)
    assert plan.gemv and plan.tiling == (tiling or qm.default_gemv_tiling(kind, k, n, group))
    for dtype in (jnp.bfloat16, jnp.float32):
      x = jnp.asarray(rng.standard_normal((1, 1, k)), dtype)
      fn = lambda x, t=tiling: quantized_matmul(x, q, scale, kind=kind, backend='triton',
                                                interpret=True, tiling=t, gemv=True)
      jaxpr = str(jax.make_jaxpr(fn)(x))
      assert 'gemv' in jaxpr and ' pad[' not in jaxpr
      out = jax.jit(fn)(x)
      assert out.shape == (1, 1, n) and out.dtype == dtype
      _assert_close(out, _reference(x, q, scale, kind, group), dtype)


def test_gemv_many_weights_and_more_rows():
  """q/k/v-like widths in one GEMV launch equal their references; two rows ignore gemv and take
  the dot kernel; the gradient is the XLA path's."""
  rng = np.random.default_rng()
  k = 256
  weights = [_weight(rng, 'int8', k, n)[:2] for n in (128, 32, 32)]
  x = jnp.asarray(rng.standard_normal((1, k)), jnp.bfloat16)
  fn = lambda x: qm.quantized_matmul_many(x, weights, kind='int8', backend='triton',
                                          interpret=True, gemv=True)
  assert _pallas_calls(fn, x) == 1
  for out, (q, s) in zip(jax.jit(fn)(x), weights):
    _assert_close(out, int8_matmul_reference(x, q, s), jnp.bfloat16)
  assert not qm.plan('int8', 2, k, 128, backend='triton', gemv=True).gemv
  x2 = jnp.asarray(rng.standard_normal((2, k)), jnp.bfloat16)
  assert 'gemv' not in str(jax.make_jaxpr(fn)(x2))
  q, s = weights[0]
  x = jnp.asarray(rng.standard_normal((1, k)), jnp.float32)
  ct = jnp.asarray(rng.standard_normal((1, 128)), jnp.float32)
  grad = lambda **kw: jax.grad(lambda x, s: jnp.sum(ct * quantized_matmul(
      x, q, s, kind='int8', interpret=True, **kw)), argnums=(0, 1))(x, s)
  for a, b in zip(grad(backend='triton', gemv=True), grad(backend='xla')):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_gemv_takes_shapes_the_dot_kernels_cannot():
  """The GEMV kernels have no dot, so one row takes int4 groups of 16 and 8 and a K that is no
  multiple of 16 on the kernel (equal to the reference) where the dot kernels, and so two rows
  under 'auto' on a GPU, fall back to XLA; a group of 1 entry is one clear error."""
  rng = np.random.default_rng()
  for kind, k, n, group in (('int4', 256, 64, 16), ('int4', 128, 32, 8), ('int8', 72, 48, None),
                            ('int4', 72, 32, 8)):
    q, scale, group = _weight(rng, kind, k, n, group or 64)
    assert qm.kernel_unsupported(kind, k, n, group) is not None
    assert qm.kernel_unsupported(kind, k, n, group, gemv=True) is None
    plan = qm.plan(kind, 1, k, n, group, backend='triton', gemv=True)
    assert plan.gemv and plan.tiling == qm.default_gemv_tiling(kind, k, n, group)
    x = jnp.asarray(rng.standard_normal((1, k)), jnp.float32)
    fn = lambda x: quantized_matmul(x, q, scale, kind=kind, backend='triton', interpret=True,
                                    gemv=True)
    assert 'gemv' in str(jax.make_jaxpr(fn)(x))
    _assert_close(jax.jit(fn)(x), _reference(x, q, scale, kind, group), jnp.float32)
    with pytest.raises(ValueError, match='the quantized matmul kernel cannot tile'):
      qm.plan(kind, 2, k, n, group, backend='triton', gemv=True)
  with mock.patch.object(jax, 'default_backend', lambda: 'gpu'):
    assert qm.plan('int4', 1, 256, 64, 16, gemv=True).gemv
    auto = qm.plan('int4', 2, 256, 64, 16, gemv=True)
    assert auto.backend == 'xla' and 'the dot kernel needs groups of at least 32' in auto.reason
  with pytest.raises(ValueError, match=r'int4 groups of 1 entries \(K=64\): the GEMV kernel '
                     'needs groups of at least 2'):
    qm.plan('int4', 1, 64, 32, 1, backend='triton', tiling=(32, 2, 1), gemv=True)


def test_gemv_tiling_errors():
  with pytest.raises(ValueError, match='bn=48 must be a power of two'):
    qm.plan('int8', 1, 256, 96, backend='triton', tiling=(48, 64, 1), gemv=True)
  with pytest.raises(ValueError, match=r'bk x split = 64 x 8 must divide K=256'):
    qm.plan('int8', 1, 256, 128, backend='triton', tiling=(128, 64, 8), gemv=True)
  with pytest.raises(ValueError, match='exceeds the 8192 float32 entries'):
    qm.plan('int8', 1, 512, 256, backend='triton', tiling=(256, 64, 1), gemv=True)
  with pytest.raises(ValueError, match='int4 bk=64 and group=96'):
    qm.plan('int4', 1, 384, 128, 96, backend='triton', tiling=(128, 64, 1), gemv=True)


@pytest.mark.parametrize('kind', ['int8', 'int4'])
@pytest.mark.parametrize('in_shard_map,tiling', [(False, (128, 64, 4)), (True, (64, 128, 8))])
def test_gemv_lowers_to_a_valid_triton_module(kind, in_shard_map, tiling, monkeypatch, capfd):
  """The GEMV kernel lowered for CUDA at gpt_1b's q/k/v widths in one launch, bf16 x: a
  reduction and no dot; verified, alone with a K loop of 8 steps (4 for int4's pieces) and inside
  shard_map with an unrolled one of 2."""
  from effjax.kernels.quantized_matmul import gpu
  from tests.kernels.triton_lowering import assert_verified, triton_dump
  k = 2048
  args = [jax.ShapeDtypeStruct((1, k), jnp.bfloat16)]
  for n in (2048, 512, 512):
    if kind == 'int8':
      args += [jax.ShapeDtypeStruct((k, n), jnp.int8), jax.ShapeDtypeStruct((1, n), jnp.float32)]
    else:
      args += [jax.ShapeDtypeStruct((k // 2, n), jnp.uint8),
               jax.ShapeDtypeStruct((k // 128, n), jnp.float32)]
  fn = lambda x, *w: tuple(qm.quantized_matmul_many(x, list(zip(w[0::2], w[1::2])), kind=kind,
                                                    backend='triton', gemv=True,
                                                    tiling=tiling))
  if in_shard_map:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('d',))
    fn = jax.shard_map(fn, mesh=mesh, in_specs=(P('d'),) + (P(),) * 6, out_specs=(P('d'),) * 3)
  dump = triton_dump(monkeypatch, capfd, gpu, fn, *args)
  assert 'tt.reduce' in dump and 'tt.dot' not in dump and 'scf.if' in dump
  assert_verified(dump, 1)


@pytest.mark.parametrize('kind', ['int8', 'int4'])
def test_gemv_small_steps_lower_to_a_valid_triton_module(kind, monkeypatch, capfd):
  """K = 72 (steps of 8) and int4 groups of 8 (pieces of 4 packed rows): shapes only the GEMV
  kernels take, lowered for CUDA and verified."""
  from effjax.kernels.quantized_matmul import gpu
  from tests.kernels.triton_lowering import assert_verified, triton_dump
  k, n = 72, 32
  w = ([jax.ShapeDtypeStruct((k, n), jnp.int8), jax.ShapeDtypeStruct((1, n), jnp.float32)]
       if kind == 'int8' else
       [jax.ShapeDtypeStruct((k // 2, n), jnp.uint8), jax.ShapeDtypeStruct((k // 8, n),
                                                                            jnp.float32)])
  fn = lambda x, q, s: quantized_matmul(x, q, s, kind=kind, backend='triton', gemv=True)
  dump = triton_dump(monkeypatch, capfd, gpu, fn, jax.ShapeDtypeStruct((1, k), jnp.bfloat16), *w)
  assert 'tt.reduce' in dump and 'tt.dot' not in dump
  assert_verified(dump, 1)


@pytest.mark.parametrize('kind', ['int8', 'int4'])
def test_gemv_gradients_and_default_tiling(kind):
  """The GEMV path's gradients are the XLA path's (x and the scales); the default tiling divides
  the shapes, keeps the programs within TARGET_GEMV_PROGRAMS and takes the int4 step up to a
  group; an accumulator too large is one clear error naming it."""
  rng = np.random.default_rng()
  k, n = 512, 96
  q, scale, group = _weight(rng, kind, k, n, 64)
  x = jnp.asarray(rng.standard_normal((1, k)), jnp.float32)
  ct = jnp.asarray(rng.standard_normal((1, n)), jnp.float32)
  grad = lambda **kw: jax.grad(lambda x, s: jnp.sum(ct * quantized_matmul(
      x, q, s, kind=kind, interpret=True, **kw)), argnums=(0, 1))(x, scale)
  for a, b in zip(grad(backend='triton', gemv=True), grad(backend='xla')):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))
  for kk, widths in ((2048, (2048,)), (5632, (2048,)), (2048, (5632, 5632)), (2048, (96, 32))):
    bn, bk, split = qm.default_gemv_tiling(kind, kk, widths, 128 if kind == 'int4' else None)
    programs = sum(w // bn for w in widths) * split
    assert all(w % bn == 0 for w in widths) and kk % (bk * split) == 0
    assert programs <= qm.TARGET_GEMV_PROGRAMS or split == 1
    assert bk == qm.DEFAULT_GEMV_BK[kind] and bn == min(qm.DEFAULT_GEMV_BN, *(w & -w for w in widths))
  with pytest.raises(ValueError, match=r'accumulator of 64 x 256 \(bk=128, bn=256\)'):
    qm.plan('int4', 1, 512, 256, 128, backend='triton', tiling=(256, 128, 1), gemv=True)


def _tune_decode_module():
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[2] / 'experiments/quantized_matmul/tune_decode.py'
  spec = importlib.util.spec_from_file_location('tune_decode', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_tune_decode_steps_settings_give_each_program_its_steps():
  """tune_decode.py --gemv's 'BN:BK:sN' settings: the split leaves every program at least N K
  steps (exactly N where N divides the step count), the tiling stays valid for the GEMV kernel,
  and malformed settings are one clear error."""
  from effjax.kernels.quantized_matmul import gpu
  td = _tune_decode_module()
  rng = np.random.default_rng()
  steps_wanted = int(rng.choice([1, 2, 4, 8]))
  bk = int(rng.choice([16, 32, 64]))
  assert td.parse_setting(f'128:{bk}:s{steps_wanted}', gemv=True) == (128, bk,
                                                                     f's{steps_wanted}')
  with mock.patch.dict(qm.DEFAULT_GEMV_BK, {'int8': bk}):
    tiling = td.steps_tiling(qm, steps_wanted)
    for k, n in ((2048, 2048), (2048, 5632), (5632, 2048), (2048, (2048, 2048, 2048))):
      bn, got_bk, split = tiling('int8', k, n)
      count = k // got_bk
      assert got_bk == bk and count % split == 0 and count // split >= steps_wanted
      if count % steps_wanted == 0:
        assert count // split == steps_wanted
      for width in qm._widths(n):  # pylint: disable=protected-access
        gpu.check_gemv_tiling('int8', k, width, bn=bn, bk=got_bk, split=split)
  for bad, gemv in (('128:64:s4', False), ('128:64', True), ('128:64:s0', True),
                    ('a:64:512', True)):
    with pytest.raises(SystemExit, match='--settings'):
      td.parse_setting(bad, gemv)


# ------------------------------------------------------------------------------------------------
# The output-major GEMV kernels (output_major=True): weights stored [N, K] for decoding.


def _ops_outside_kernels(jaxpr) -> set[str]:
  """The primitives of a jaxpr and its sub-jaxprs, not looking inside pallas_call."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    if eqn.primitive.name == 'pallas_call':
      continue
    for value in eqn.params.values():
      inner = getattr(value, 'jaxpr', value)
      if hasattr(inner, 'eqns'):
        names |= _ops_outside_kernels(inner)
  return names


def _transposed(q, scale):
  return q.T, scale.T


@pytest.mark.parametrize('widen', ['magic', 'words', 'words_x'])
@pytest.mark.parametrize('kind', ['int8', 'int4'])
def test_gemv_output_major_matches_reference(kind, widen, monkeypatch):
  """One row through the output-major kernels equals the reference for bf16 and float32 x, at
  the default tiling and explicit ones: an unrolled and a looped K (more than
  MAX_UNROLLED_NK_STEPS steps), a K step smaller and larger than the int4 group, a K of 72 and
  a row tile of 1; the output is final (one pallas_call, no split-K sum, x's dtype). Both
  integer widenings (gpu.NK_WIDEN: bytes, or 32-bit words: int4 groups of 8 take one word a
  row, int8 steps of 4 one word, and steps or groups under a word fall back to bytes), the
  words with x prepared by XLA or gathered and scaled inside the kernel ('words_x')."""
  from effjax.kernels.quantized_matmul import gpu
  monkeypatch.setattr(gpu, 'NK_WIDEN', widen)
  rng = np.random.default_rng()
  for k, n, group, tiling in ((256, 96, 64, None), (2048, 64, 128, (4, 64, 1)),
                              (512, 32, 32, (1, 256, 1)), (72, 48, 8, None),
                              (512, 64, 128, (8, 32, 1)), (64, 32, 8, (4, 4, 1)),
                              (64, 32, 4, (4, 2, 1))):
    q, scale, group = _weight(rng, kind, k, n, group)
    q_t, s_t = _transposed(q, scale)
    plan = qm.plan(kind, 1, k, n, group, backend='triton', tiling=tiling, output_major=True)
    assert plan.output_major and plan.tiling == (tiling or qm.default_gemv_nk_tiling(
        kind, k, n, group))
    if tiling and tiling[1] == 64 and k == 2048:
      assert k // tiling[1] > gpu.MAX_UNROLLED_NK_STEPS
    for dtype in (jnp.bfloat16, jnp.float32):
      x = jnp.asarray(rng.standard_normal((1, 1, k)), dtype)
      fn = lambda x, t=tiling: quantized_matmul(x, q_t, s_t, kind=kind, backend='triton',
                                                interpret=True, tiling=t, output_major=True)
      assert _pallas_calls(fn, x) == 1
      assert 'reduce_sum' not in _ops_outside_kernels(jax.make_jaxpr(fn)(x).jaxpr)
      # 'words' unless a step (or int4 group) holds less than a word of values
      bk = plan.tiling[1]
      by_words = widen != 'magic' and (bk % 4 == 0 if kind == 'int8' else min(bk, group) % 8 == 0)
      assert (f'{kind}_gemv_nk_words' in str(jax.make_jaxpr(fn)(x))) == by_words
      assert (f'{kind}_gemv_nk_words_x' in str(jax.make_jaxpr(fn)(x))) == (
          by_words and widen == 'words_x')
      out = jax.jit(fn)(x)
      assert out.shape == (1, 1, n) and out.dtype == dtype
      _assert_close(out, _reference(x, q, scale, kind, group), dtype)


def test_gemv_output_major_many_weights_rows_and_gradients():
  """q/k/v-like widths in one output-major launch equal their references; two rows (prefill)
  and the 'xla' backend compute the same products from the transposed weights without a kernel;
  the kernel path's gradients are the XLA path's."""
  rng = np.random.default_rng()
  k = 256
  for kind in ('int8', 'int4'):
    weights = [_weight(rng, kind, k, n, 64) for n in (128, 32, 32)]
    stored = [_transposed(q, s) for q, s, _ in weights]
    x = jnp.asarray(rng.standard_normal((1, k)), jnp.bfloat16)
    fn = lambda x, b='triton': qm.quantized_matmul_many(x, stored, kind=kind, backend=b,
                                                         interpret=True, output_major=True)
    assert _pallas_calls(fn, x) == 1
    for out, (q, s, g) in zip(jax.jit(fn)(x), weights):
      _assert_close(out, _reference(x, q, s, kind, g), jnp.bfloat16)
    x2 = jnp.asarray(rng.standard_normal((3, k)), jnp.bfloat16)
    assert qm.plan(kind, 3, k, 128, 64, backend='triton', output_major=True).backend == 'xla'
    for backend, xs in (('triton', x2), ('xla', x)):
      assert _pallas_calls(functools.partial(fn, b=backend), xs) == 0
      for out, (q, s, g) in zip(jax.jit(fn, static_argnums=1)(xs, backend), weights):
        _assert_close(out, _reference(xs, q, s, kind, g), jnp.bfloat16)
    q, s, g = weights[0]
    q_t, s_t = _transposed(q, s)
    x = jnp.asarray(rng.standard_normal((1, k)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((1, 128)), jnp.float32)
    grad = lambda **kw: jax.grad(lambda x, s: jnp.sum(ct * quantized_matmul(
        x, q_t, s, kind=kind, interpret=True, output_major=True, **kw)), argnums=(0, 1))(x, s_t)
    for a, b in zip(grad(backend='triton'), grad(backend='xla')):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_gemv_output_major_tiling_and_errors():
  """The default tiling divides the shapes with no split and fits the accumulator; a bad tiling
  or layout is one error naming the rule."""
  for kind, group in (('int8', None), ('int4', 128)):
    for k, widths in ((2048, (2048, 512, 512)), (5632, (2048,)), (2048, (5632, 5632))):
      bn, bk, split = qm.default_gemv_nk_tiling(kind, k, widths, group)
      assert split == 1 and k % bk == 0 and all(w % bn == 0 for w in widths)
      assert bn == qm.DEFAULT_GEMV_NK_BN[kind] and bk <= qm.DEFAULT_GEMV_NK_BK[kind]
  with pytest.raises(ValueError, match=r'\(bn, bk, 1\) \(no split-K\)'):
    qm.plan('int8', 1, 256, 64, backend='triton', tiling=(8, 64, 2), output_major=True)
  with pytest.raises(ValueError, match='bn=3 must be a power of two'):
    qm.plan('int8', 1, 256, 96, backend='triton', tiling=(3, 64, 1), output_major=True)
  with pytest.raises(ValueError, match='bk=128 must divide K=192'):
    qm.plan('int8', 1, 192, 64, backend='triton', tiling=(8, 128, 1), output_major=True)
  with pytest.raises(ValueError, match=r'accumulator of 32 x 512'):
    qm.plan('int8', 1, 512, 64, backend='triton', tiling=(32, 512, 1), output_major=True)
  with pytest.raises(ValueError, match='int4 bk=64 and group=96'):
    qm.plan('int4', 1, 384, 128, 96, backend='triton', tiling=(8, 64, 1), output_major=True)
  with pytest.raises(ValueError, match=r'output_major=True \(weights stored \[N, K\].*int8 '
                     r'qvalue must have K=256 rows'):
    rng = np.random.default_rng()
    q, s, _ = _weight(rng, 'int8', 128, 64)
    quantized_matmul(jnp.ones((1, 256), jnp.float32), q.T, s.T, kind='int8', output_major=True)


@pytest.mark.parametrize('kind', ['int8', 'int4'])
@pytest.mark.parametrize('k,widths,in_shard_map,widen', [(2048, (2048, 512, 512), False, 'magic'),
                                                          (5632, (2048,), True, 'magic'),
                                                          (2048, (2048,), False, 'convert'),
                                                          (5632, (2048,), True, 'words'),
                                                          (2048, (2048, 512, 512), False, 'words'),
                                                          (5632, (2048,), True, 'words_x'),
                                                          (2048, (2048, 512, 512), False,
                                                           'words_x')])
def test_gemv_output_major_lowers_to_a_valid_triton_module(kind, k, widths, in_shard_map, widen,
                                                           monkeypatch, capfd):
  """The output-major kernels lowered for CUDA at gpt_1b's shapes (q/k/v in one launch; the
  down projection's K of 5632, 11 unrolled steps, inside shard_map), with either widening,
  verified: a reduction, no dot, no loop; 'magic' widens with bitcasts, not conversions, and
  'words' so too, from 32-bit loads."""
  from effjax.kernels.quantized_matmul import gpu
  from tests.kernels.triton_lowering import assert_verified, triton_dump
  monkeypatch.setattr(gpu, 'NK_WIDEN', widen)
  args = [jax.ShapeDtypeStruct((1, k), jnp.bfloat16)]
  for n in widths:
    if kind == 'int8':
      args += [jax.ShapeDtypeStruct((n, k), jnp.int8), jax.ShapeDtypeStruct((n, 1), jnp.float32)]
    else:
      args += [jax.ShapeDtypeStruct((n, k // 2), jnp.uint8),
               jax.ShapeDtypeStruct((n, k // 128), jnp.float32)]
  fn = lambda x, *w: tuple(qm.quantized_matmul_many(x, list(zip(w[0::2], w[1::2])), kind=kind,
                                                    backend='triton', output_major=True))
  if in_shard_map:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('d',))
    fn = jax.shard_map(fn, mesh=mesh, in_specs=(P('d'),) + (P(),) * (len(args) - 1),
                       out_specs=(P('d'),) * len(widths))
  dump = triton_dump(monkeypatch, capfd, gpu, fn, *args)
  assert 'tt.reduce' in dump and 'tt.dot' not in dump
  assert 'scf.for' not in dump  # every step unrolled at these shapes
  assert ('tt.bitcast' in dump) == (widen != 'convert') and ('arith.sitofp' in dump) == (
      widen == 'convert')
  assert bool(re.search(r'tt\.load \S+ : tensor<[0-9x]+x!tt\.ptr<i32>>', dump)) == (
      widen in ('words', 'words_x'))
  assert_verified(dump, 1)


def test_tune_decode_nk_settings():
  """tune_decode.py --nk's 'BN:BK' settings parse to (bn, bk, None); other forms are refused."""
  td = _tune_decode_module()
  from effjax.kernels.quantized_matmul import gpu
  assert td.parse_setting('8:512', False, nk=True) == (8, 512, None)
  assert td.parse_setting('8:512:convert', False, nk=True) == (8, 512, 'convert')
  assert td.NK_WIDEN_CHOICES == gpu.NK_WIDEN_CHOICES
  for bad in ('8:512:1', '8', 'a:512', '0:512', '8:512:fast'):
    with pytest.raises(SystemExit, match='is not BN:BK or BN:BK:WIDEN'):
      td.parse_setting(bad, False, nk=True)
  assert td.parse_width('4:512@5632', nk=True) == 5632 and td.parse_width('4:512', True) is None
  for bad, nk in (('4:512@', True), ('4:512@x', True), ('4:512@0', True), ('8:64:512@2048', False)):
    with pytest.raises(SystemExit, match='a suffix @K'):
      td.parse_width(bad, nk)


def test_gemv_output_major_tiling_per_k(monkeypatch):
  """DEFAULT_GEMV_NK_BY_K replaces the kind's row tile and K step limits for its K only."""
  monkeypatch.setattr(qm, 'DEFAULT_GEMV_NK_BY_K', {('int8', 5632): (4, 256)})
  assert qm.default_gemv_nk_tiling('int8', 5632, 2048) == (4, 256, 1)
  assert qm.default_gemv_nk_tiling('int8', 2048, 2048) == (
      qm.DEFAULT_GEMV_NK_BN['int8'], qm.DEFAULT_GEMV_NK_BK['int8'], 1)
  assert qm.default_gemv_nk_tiling('int4', 5632, 2048, 128)[:2] == (
      qm.DEFAULT_GEMV_NK_BN['int4'], min(qm.DEFAULT_GEMV_NK_BK['int4'], 512))


def test_output_major_default_widening_per_kind(monkeypatch):
  """With gpu.NK_WIDEN unset each kind takes its default widening (int4 32-bit words, int8
  bytes), visible in the kernel's name; NK_WIDEN overrides both; an unknown one is one error."""
  from effjax.kernels.quantized_matmul import gpu
  monkeypatch.setattr(gpu, 'NK_WIDEN', None)
  rng = np.random.default_rng()
  x = jnp.asarray(rng.standard_normal((1, 512)), jnp.float32)
  for kind in ('int8', 'int4'):
    q, scale, _ = _weight(rng, kind, 512, 64, 128)
    fn = lambda x: quantized_matmul(x, q.T, scale.T, kind=kind, backend='triton', interpret=True,
                                    output_major=True)
    words = gpu.DEFAULT_NK_WIDEN[kind] == 'words'
    assert (f'{kind}_gemv_nk_words' in str(jax.make_jaxpr(fn)(x))) == words
    assert gpu.nk_widen(kind) == gpu.DEFAULT_NK_WIDEN[kind]
  assert gpu.DEFAULT_NK_WIDEN == {'int8': 'magic', 'int4': 'words'}
  monkeypatch.setattr(gpu, 'NK_WIDEN', 'convert')
  assert gpu.nk_widen('int4') == gpu.nk_widen('int8') == 'convert'
  monkeypatch.setattr(gpu, 'NK_WIDEN', 'fast')
  with pytest.raises(ValueError, match="widening 'fast' for int4: allowed magic, convert, words, "
                                       "words_x"):
    gpu.nk_widen('int4')


@pytest.mark.parametrize('kind', ['int8', 'int4'])
def test_output_major_widenings_agree_exactly(kind, monkeypatch):
  """gpu.NK_WIDEN: the integer-ops widening ('magic') gives every stored value exactly (all 256
  int8 values, both nibbles of all 256 bytes) and the same products as the conversion
  instruction's ('convert'); from 32-bit words ('words') every value of random words comes out
  exactly at its place value, and the products to float32 rounding (another summation order)."""
  from effjax.kernels.quantized_matmul import gpu
  byte = jnp.arange(256, dtype=jnp.int32).reshape(16, 16)
  if kind == 'int8':
    q = byte.astype(jnp.uint8).astype(jnp.int8)  # -128..127
    np.testing.assert_array_equal(gpu._widen_int8(q), q.astype(jnp.float32))
  else:
    low, high = gpu._widen_nibbles(byte.astype(jnp.uint8))
    want_low, want_high = gpu._nibbles(byte.astype(jnp.uint8))
    np.testing.assert_array_equal(low, want_low.astype(jnp.float32))
    np.testing.assert_array_equal(high, want_high.astype(jnp.float32))
  # 'words': random 32-bit words and the extremes, every value at its place value
  words = np.random.default_rng().integers(0, 2 ** 32, (64, 8), dtype=np.int64)
  words = np.concatenate([words, np.array([[0xFFFFFFFF, 0x88888888, 0x77777777, 0x80808080] * 2])])
  bits, _, _, places = gpu.WORDS[kind]
  values = gpu._widen_word(jnp.asarray(words.astype(np.uint32).view(np.int32)), kind)
  assert len(values) == 32 // bits
  for j, (v, place) in enumerate(zip(values, places)):
    field = (words >> (bits * j)) & ((1 << bits) - 1)
    np.testing.assert_array_equal(np.asarray(v) / 2.0 ** (bits * place),
                                  np.where(field >= 1 << (bits - 1), field - (1 << bits), field))
  rng = np.random.default_rng()
  q, scale, group = _weight(rng, kind, 512, 64, 128)
  x = jnp.asarray(rng.standard_normal((1, 512)), jnp.float32)
  outs = {}
  for widen in gpu.NK_WIDEN_CHOICES:
    monkeypatch.setattr(gpu, 'NK_WIDEN', widen)
    outs[widen] = quantized_matmul(x, q.T, scale.T, kind=kind, backend='triton', interpret=True,
                                   output_major=True)
  np.testing.assert_array_equal(outs['magic'], outs['convert'])
  np.testing.assert_allclose(outs['words'], outs['magic'], rtol=1e-5,
                             atol=1e-6 * float(jnp.max(jnp.abs(outs['magic']))))
