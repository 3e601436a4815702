"""The Mosaic GPU flash attention kernel (Hopper: TMA + wgmma) on a CPU machine.

Two checks need no GPU:
  - lowering: exporting for platform 'cuda' builds the Mosaic GPU module (warpgroup semantics,
    barriers, TMA descriptors, wgmma layouts and register-layout inference all run here), for every
    mask kind, head dim and GQA ratio; any JAX the project supports.
  - interpretation: JAX >= 0.11's Mosaic GPU interpreter runs the kernel's three warpgroups as
    threads, with TMA copies, barriers (it fails on a barrier released with unobserved phases)
    and wgmma, and the result is compared with the reference on fresh random inputs.
The tile tables the kernel walks are checked against brute force.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from effjax.kernels.flash_attention import (
  BlockLayout,
  attention_reference,
  bigbird_layout,
  computed_blocks,
  flash_attention,
)
from effjax.kernels.flash_attention import mosaic_gpu
from effjax.kernels.flash_attention.layout import retile, token_mask
from effjax.kernels.flash_attention.reference import EMPTY_ROW_LSE, attention_reference_with_lse
from tests.kernels.test_flash_attention import _qkv as qkv_of_dtype
from tests.kernels.test_flash_attention import _segments

_JAX = tuple(int(p) for p in jax.__version__.split('.')[:2])
needs_interpreter = pytest.mark.skipif(
    _JAX < (0, 11), reason='the Mosaic GPU interpreter runs layout casts and transposed SMEM refs '
                           'from JAX 0.11 on (CI runs these in a second Python with JAX 0.11)')


def _qkv(rng, b, s, hq, hkv, d):
  return qkv_of_dtype(rng, b, s, hq, hkv, d, jnp.bfloat16)  # the kernel's dtype


def _masks(case, rng, s):
  """Keyword arguments of one masking case (shared by the lowering and interpreter tests)."""
  if case == 'causal':
    return {'causal': True}
  if case == 'bidirectional':
    return {'causal': False}
  if case == 'window':
    return {'causal': True, 'window': int(rng.integers(1, 3 * s // 4))}
  if case == 'window_bidirectional':
    return {'causal': False, 'window': int(rng.integers(1, s // 2))}
  if case == 'segments':
    return {'causal': True, 'segment_ids': _segments(rng, 1, s, padding=True)}
  if case == 'empty_blocks':  # query block 1 sees nothing and key block 1 is seen by nobody
    rows = [[j == 0 and i % 2 == 0 for j in range(s // 128)] for i in range(s // 128)]
    return {'causal': False, 'layout': BlockLayout(block=128, rows=tuple(map(tuple, rows)))}
  if case == 'bigbird':
    return {'causal': True, 'layout': bigbird_layout(s, 128, local_blocks=1, global_blocks=1,
                                                     random_blocks=1,
                                                     seed=int(rng.integers(100)))}
  raise ValueError(case)


def _mosaic_module(fn, *args) -> str:
  exported = export.export(jax.jit(fn), platforms=['cuda'])(*args)
  return exported.mlir_module()


# ------------------------------------------------------------------------------------------------
# Lowering for CUDA.


@pytest.mark.parametrize('case,d,hq,hkv', [
    ('causal', 128, 4, 4), ('bidirectional', 64, 4, 1), ('window', 128, 2, 2),
    ('window_bidirectional', 64, 2, 2), ('segments', 128, 4, 2), ('bigbird', 128, 2, 1),
    ('causal', 256, 2, 2)])
def test_lowers_for_cuda(case, d, hq, hkv):
  rng = np.random.default_rng()
  s = 512
  kw = _masks(case, rng, s)
  seg = kw.pop('segment_ids', None)
  shapes = [jax.ShapeDtypeStruct((1, s, h, d), jnp.bfloat16) for h in (hq, hkv, hkv)]
  fn = lambda q, k, v: flash_attention(q, k, v, segment_ids=seg, backend='mosaic_gpu', **kw)
  module = _mosaic_module(fn, *shapes)
  assert module.count('mosaic_gpu') >= 1 and '@mosaic_gpu' in module, module[-2000:]


@pytest.mark.parametrize('case,d,hq,hkv', [('causal', 128, 4, 4), ('segments', 64, 4, 2),
                                            ('bigbird', 128, 2, 1), ('causal', 256, 2, 2)])
def test_overlapped_forward_lowers_for_cuda(case, d, hq, hkv, monkeypatch):
  """overlap_qk (the next tile's Q K^T under this tile's softmax) builds for CUDA at each head
  dim's default tiling, alone and with the other variants it combines with."""
  for variants in ('overlap_qk', 'named_schedule,order_softmax,overlap_qk'):
    monkeypatch.setenv('EFFJAX_MOSAIC_GPU_FWD', variants)
    test_lowers_for_cuda(case, d, hq, hkv)


@pytest.mark.parametrize('case,d,hq,hkv', [('causal', 128, 4, 1), ('segments', 64, 2, 2),
                                            ('bigbird', 128, 2, 2), ('window', 64, 2, 1),
                                            ('causal', 256, 4, 2), ('segments', 256, 2, 1)])
def test_gradients_lower_for_cuda(case, d, hq, hkv, monkeypatch):
  """One jitted grad: the forward and both backward kernels (dK/dV, dQ) are Mosaic GPU (head dim
  256: the head-dim-split backward, the default)."""
  monkeypatch.delenv('EFFJAX_MOSAIC_GPU_BWD_D256', raising=False)
  rng = np.random.default_rng()
  s = 512
  kw = _masks(case, rng, s)
  seg = kw.pop('segment_ids', None)
  shapes = [jax.ShapeDtypeStruct((1, s, h, d), jnp.bfloat16) for h in (hq, hkv, hkv)]
  loss = lambda q, k, v: flash_attention(q, k, v, segment_ids=seg, backend='mosaic_gpu',
                                         **kw).astype(jnp.float32).sum()
  module = _mosaic_module(jax.grad(loss, argnums=(0, 1, 2)), *shapes)
  assert module.count('@mosaic_gpu') == 3 and 'triton' not in module


@pytest.mark.skipif(_JAX >= (0, 11), reason='JAX 0.11 lowers Pallas Triton only with a GPU '
                                             'present (it reads the compute capability)')
def test_head_dim_256_gradients_lower_through_triton_backward_when_asked(monkeypatch):
  monkeypatch.setenv('EFFJAX_MOSAIC_GPU_BWD_D256', 'triton')
  shapes = [jax.ShapeDtypeStruct((1, 256, 2, 256), jnp.bfloat16)] * 3
  loss = lambda q, k, v: flash_attention(q, k, v, backend='mosaic_gpu').astype(
      jnp.float32).sum()
  check = export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')
  module = export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=['cuda'],
                         disabled_checks=[check])(*shapes).mlir_module()
  assert module.count('@mosaic_gpu') == 1 and 'triton' in module


# ------------------------------------------------------------------------------------------------
# The kernel in the Mosaic GPU interpreter against the reference.


@needs_interpreter
@pytest.mark.parametrize('case,d,hq,hkv,block_k', [
    ('causal', 64, 2, 1, 64), ('bidirectional', 128, 1, 1, 128), ('window', 64, 1, 1, 64),
    ('window_bidirectional', 64, 1, 1, 128), ('segments', 64, 2, 2, 64), ('bigbird', 64, 2, 1, 64),
    ('causal', 256, 1, 1, 64), ('bidirectional', 64, 2, 1, 256)])
def test_interpreted_kernel_matches_reference(case, d, hq, hkv, block_k):
  rng = np.random.default_rng()
  s = 256
  kw = _masks(case, rng, s)
  seg = kw.pop('segment_ids', None)
  q, k, v = _qkv(rng, 1, s, hq, hkv, d)
  scale = float(rng.uniform(0.5, 1.5)) * d ** -0.5
  blocks = computed_blocks(s, mosaic_gpu.BLOCK_Q, block_k, causal=kw['causal'],
                           window=kw.get('window'), layout=kw.get('layout'))
  out, lse = jax.jit(lambda q, k, v: mosaic_gpu.fwd(
      q, k, v, seg, causal=kw['causal'], window=kw.get('window'), blocks=blocks, scale=scale,
      block_q=mosaic_gpu.BLOCK_Q, block_k=block_k, interpret=True))(q, k, v)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  want_out, want_lse = attention_reference_with_lse(*f32, segment_ids=seg, scale=scale, **kw)
  np.testing.assert_allclose(np.asarray(out, np.float32), want_out, atol=2e-2, rtol=2e-2)
  np.testing.assert_allclose(lse, want_lse, atol=2e-3, rtol=1e-4)
  assert out.dtype == q.dtype and lse.shape == (1, hq, s) and lse.dtype == jnp.float32


_ALL_FWD_VARIANTS = 'named_schedule,wait_k_in_pv,order_softmax'  # overlap_qk excludes the 2nd
_OVERLAPPED = 'named_schedule,order_softmax,overlap_qk'


@needs_interpreter
@pytest.mark.parametrize('variants,case,d,hq,hkv,block_k', [
    ('named_schedule', 'causal', 64, 2, 1, 64),
    ('named_schedule', 'bigbird', 64, 2, 1, 64),
    (_ALL_FWD_VARIANTS, 'causal', 128, 1, 1, 128),
    (_ALL_FWD_VARIANTS, 'segments', 64, 2, 2, 64),
    (_ALL_FWD_VARIANTS, 'window_bidirectional', 64, 1, 1, 128),
    ('wait_k_in_pv,order_softmax', 'empty_blocks', 64, 1, 1, 64),
    ('overlap_qk', 'causal', 128, 1, 1, 128),
    ('overlap_qk', 'segments', 64, 2, 2, 64),
    ('overlap_qk', 'empty_blocks', 64, 1, 1, 64),
    (_OVERLAPPED, 'bigbird', 64, 2, 1, 64),
    (_OVERLAPPED, 'window_bidirectional', 64, 1, 1, 128)])
def test_interpreted_forward_variants_match_reference(variants, case, d, hq, hkv, block_k,
                                                      monkeypatch):
  """The main-loop variants (EFFJAX_MOSAIC_GPU_FWD): the interpreter runs their named barriers
  (a protocol with a signal missing hangs it) and the result equals the reference."""
  monkeypatch.setenv('EFFJAX_MOSAIC_GPU_FWD', variants)
  test_interpreted_kernel_matches_reference(case, d, hq, hkv, block_k)


def test_forward_variants_lower_with_named_barriers(monkeypatch):
  """named_schedule puts bar.arrive / bar.sync into the Mosaic GPU module; by default the
  forward's schedule has no named barrier (its one bar.sync is Mosaic GPU's own)."""
  shapes = [jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16)] * 3
  # A function of its own per setting: the switch is read when the forward is traced.
  fn = lambda: lambda q, k, v: flash_attention(q, k, v, causal=True, backend='mosaic_gpu')
  monkeypatch.delenv('EFFJAX_MOSAIC_GPU_FWD', raising=False)
  default = _mosaic_module(fn(), *shapes)
  monkeypatch.setenv('EFFJAX_MOSAIC_GPU_FWD', _ALL_FWD_VARIANTS)
  variants = _mosaic_module(fn(), *shapes)
  assert 'bar.arrive' not in default and 'bar.arrive' in variants
  assert variants.count('bar.sync') > default.count('bar.sync')


def test_forward_variant_switch_names_what_it_takes(monkeypatch):
  monkeypatch.setenv('EFFJAX_MOSAIC_GPU_FWD', 'named_schedule, pingpong')
  with pytest.raises(ValueError, match=r"unknown \['pingpong'\]; allowed: named_schedule, "
                                       r"wait_k_in_pv, order_softmax, overlap_qk"):
    mosaic_gpu.fwd_variants()
  monkeypatch.setenv('EFFJAX_MOSAIC_GPU_FWD', 'overlap_qk')  # two score tiles: 128 keys at D64
  assert mosaic_gpu.default_blocks(64) == (128, 128) and mosaic_gpu.default_blocks(128)[1] == 128
  monkeypatch.delenv('EFFJAX_MOSAIC_GPU_FWD')
  assert mosaic_gpu.default_blocks(64) == (128, 256)
  monkeypatch.setenv('EFFJAX_MOSAIC_GPU_FWD', 'overlap_qk,wait_k_in_pv')
  with pytest.raises(ValueError, match='overlap_qk places the k waits itself; it does not '
                                       'combine with wait_k_in_pv'):
    mosaic_gpu.fwd_variants()
  monkeypatch.setenv('EFFJAX_MOSAIC_GPU_FWD', ' named_schedule,order_softmax ')
  assert mosaic_gpu.fwd_variants() == {'named_schedule', 'order_softmax'}
  monkeypatch.setenv('EFFJAX_MOSAIC_GPU_FWD', '')
  assert mosaic_gpu.fwd_variants() == frozenset()
  with pytest.raises(ValueError, match="must be 'arrive' or 'sync'"):
    mosaic_gpu.named_barrier('wait', 4, 256)


@pytest.mark.skipif(_JAX >= (0, 11), reason='JAX 0.11 models named barriers in its interpreter')
def test_named_schedule_in_an_interpreter_that_cannot_run_it(monkeypatch):
  monkeypatch.setenv('EFFJAX_MOSAIC_GPU_FWD', 'named_schedule')
  q, k, v = _qkv(np.random.default_rng(), 1, 256, 1, 1, 64)
  blocks = computed_blocks(256, 128, 64, causal=True)
  with pytest.raises(NotImplementedError, match='named barriers, which this JAX version'):
    mosaic_gpu.fwd(q, k, v, None, causal=True, window=None, blocks=blocks, scale=0.125,
                   block_q=128, block_k=64, interpret=True)


@needs_interpreter
def test_interpreted_empty_rows_and_skipped_query_block():
  """A query block with no tile at all (the layout skips it) and padding rows write out = 0 and
  lse = EMPTY_ROW_LSE, and the other rows are unaffected."""
  rng = np.random.default_rng()
  s, d = 256, 64
  layout = BlockLayout(block=128, rows=((True, False), (False, False)))  # block 1 sees nothing
  seg = np.ones((1, s), np.int32)
  seg[0, 100:128] = 0  # padding inside query block 0
  seg = jnp.asarray(seg)
  q, k, v = _qkv(rng, 1, s, 2, 2, d)
  blocks = computed_blocks(s, 128, 64, causal=False, window=None, layout=layout)
  out, lse = jax.jit(lambda q, k, v: mosaic_gpu.fwd(
      q, k, v, seg, causal=False, window=None, blocks=blocks, scale=d ** -0.5, block_q=128,
      block_k=64, interpret=True))(q, k, v)
  out = np.asarray(out, np.float32)
  lse = np.asarray(lse)
  assert np.all(out[0, 100:] == 0) and np.all(lse[0, :, 100:] == EMPTY_ROW_LSE)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  want = attention_reference(*f32, segment_ids=seg, causal=False, layout=layout)
  np.testing.assert_allclose(out, want, atol=2e-2, rtol=2e-2)
  assert np.isfinite(lse[0, :, :100]).all() and (lse[0, :, :100] < 100).all()


@needs_interpreter
@pytest.mark.parametrize('case,d,hq,hkv,block_k', [
    ('causal', 64, 4, 1, 128), ('bidirectional', 64, 2, 2, 64), ('window', 64, 1, 1, 64),
    ('window_bidirectional', 64, 2, 1, 128), ('segments', 128, 2, 1, 64),
    ('bigbird', 64, 2, 2, 128), ('empty_blocks', 64, 2, 1, 64), ('causal', 256, 4, 2, 64),
    ('segments', 256, 2, 1, 64), ('window', 256, 1, 1, 64)])
def test_interpreted_backward_matches_reference(case, d, hq, hkv, block_k, monkeypatch):
  """The dK/dV and dQ kernels against the reference's VJP for a random cotangent, from the
  forward's tiles at (128, block_k) (re-tiled to the backward's 64-row tiles). Head dim 256
  runs the head-dim-split kernels (the default)."""
  monkeypatch.delenv('EFFJAX_MOSAIC_GPU_BWD_D256', raising=False)
  rng = np.random.default_rng()
  s = 256
  kw = _masks(case, rng, s)
  seg = kw.pop('segment_ids', None)
  q, k, v = _qkv(rng, 1, s, hq, hkv, d)
  d_out = jnp.asarray(rng.standard_normal(q.shape), jnp.bfloat16)
  scale = float(rng.uniform(0.5, 1.5)) * d ** -0.5
  f32 = lambda x: x.astype(jnp.float32)
  ref = lambda q, k, v: attention_reference(f32(q), f32(k), f32(v), segment_ids=seg, scale=scale,
                                            **kw)
  out, vjp = jax.vjp(ref, q, k, v)
  want = vjp(f32(d_out))
  _, lse = attention_reference_with_lse(f32(q), f32(k), f32(v), segment_ids=seg, scale=scale,
                                        **kw)
  blocks = computed_blocks(s, mosaic_gpu.BLOCK_Q, block_k, causal=kw['causal'],
                           window=kw.get('window'), layout=kw.get('layout'))
  got = jax.jit(lambda q, k, v, out, lse, d_out: mosaic_gpu.bwd(
      q, k, v, seg, out, lse, d_out, causal=kw['causal'], window=kw.get('window'),
      blocks=blocks, scale=scale, block_q=mosaic_gpu.BLOCK_Q, block_k=block_k,
      interpret=True))(q, k, v, out.astype(q.dtype), lse, d_out)
  for name, g, w in zip(('dq', 'dk', 'dv'), got, want):
    assert g.dtype == q.dtype and g.shape == w.shape, name
    w = np.asarray(w)
    # Plus a floor: a window of 1 (drawn at random) leaves each query only itself, so the exact dq
    # is 0 and the kernel's float rounding (about 1e-6 seen) has nothing to be relative to.
    np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=2e-2 * np.abs(w).max() + 1e-5,
                               rtol=0, err_msg=name)


@pytest.mark.parametrize('old,new', [((128, 64), (64, 128)), ((128, 128), (128, 64)),
                                     ((128, 128), (64, 128))])
@pytest.mark.parametrize('case', ['causal', 'window_bidirectional', 'bigbird'])
def test_retile_equals_computing_the_new_tiling(old, new, case):
  rng = np.random.default_rng()
  s = 1024
  kw = _masks(case, rng, s)
  blocks = computed_blocks(s, *old, **kw)
  want = computed_blocks(s, *new, **kw)
  got = retile(blocks, s, *old, *new, causal=kw['causal'], window=kw.get('window'))
  np.testing.assert_array_equal(got, want)


@needs_interpreter
def test_interpreted_op_gradients_match_reference():
  """Through flash_attention(backend='mosaic_gpu'): values and d/d(q, k, v) of a random
  projection, forward and backward kernels interpreted."""
  rng = np.random.default_rng()
  s, d = 256, 64
  q, k, v = _qkv(rng, 1, s, 2, 1, d)
  seg = _segments(rng, 1, s, padding=True)
  w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

  def value_and_grads(fn):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
    return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(
        q, k, v)

  ours = lambda q, k, v: flash_attention(q, k, v, segment_ids=seg, backend='mosaic_gpu',
                                         interpret=True)
  ref = lambda q, k, v: attention_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                            v.astype(jnp.float32), segment_ids=seg)
  out, grads = value_and_grads(ours)
  want_out, want_grads = value_and_grads(ref)
  np.testing.assert_allclose(np.asarray(out, np.float32), want_out, atol=2e-2, rtol=2e-2)
  for got, want in zip(grads, want_grads):
    got = np.asarray(got, np.float32)
    np.testing.assert_allclose(got, want, atol=5e-2 * np.abs(want).max(), rtol=5e-2)


# ------------------------------------------------------------------------------------------------
# Tile tables and errors.


@pytest.mark.parametrize('by_key', [False, True])
@pytest.mark.parametrize('case', ['causal', 'window', 'segments', 'bigbird'])
def test_tile_tables_list_full_then_partial_tiles(case, by_key):
  """Per query block (or per key block, for the dK/dV kernel): every needed tile exactly once,
  the ones needing no token mask first."""
  rng = np.random.default_rng()
  s, bq, bk = 1024, 128, 64
  kw = _masks(case, rng, s)
  seg = kw.pop('segment_ids', None)
  blocks = computed_blocks(s, bq, bk, causal=kw['causal'], window=kw.get('window'),
                           layout=kw.get('layout'))
  idx, n_full, n_total = mosaic_gpu.tile_tables(blocks, s, bq, bk, causal=kw['causal'],
                                                window=kw.get('window'),
                                                has_segments=seg is not None, by_key=by_key)
  mask = np.asarray(token_mask(s, causal=kw['causal'], window=kw.get('window'),
                               layout=kw.get('layout')))
  if by_key:
    blocks, mask, bq, bk = blocks.T, mask.T, bk, bq
  for r in range(blocks.shape[0]):
    visited = idx[r, :n_total[r]]
    assert sorted(visited) == list(np.flatnonzero(blocks[r]))
    for j, c in enumerate(visited):
      tile = mask[r * bq:(r + 1) * bq, c * bk:(c + 1) * bk]
      assert tile.any()
      if j < n_full[r]:
        assert tile.all() and seg is None  # a tile listed full needs no token mask
      else:
        assert seg is not None or not tile.all()


def test_rejects_what_the_kernel_cannot_run():
  rng = np.random.default_rng()
  q, k, v = _qkv(rng, 1, 256, 2, 2, 64)
  with pytest.raises(ValueError, match='block_q=64 is not supported'):
    flash_attention(q, k, v, backend='mosaic_gpu', block_q=64)
  with pytest.raises(ValueError, match='multiple of 64'):
    flash_attention(q, k, v, backend='mosaic_gpu', block_k=32)
  with pytest.raises(ValueError, match='bfloat16 or float16'):
    flash_attention(*[x.astype(jnp.float32) for x in (q, k, v)], backend='mosaic_gpu')
  q, k, v = _qkv(rng, 1, 192, 2, 2, 64)
  with pytest.raises(ValueError, match='not divisible by block_q=128'):
    flash_attention(q, k, v, backend='mosaic_gpu')


def test_head_dim_256_backward_switch_names_what_it_takes(monkeypatch):
  monkeypatch.setenv('EFFJAX_MOSAIC_GPU_BWD_D256', 'cudnn')
  with pytest.raises(ValueError, match="EFFJAX_MOSAIC_GPU_BWD_D256='cudnn': must be 'triton' or "
                                       "'mosaic_gpu'"):
    mosaic_gpu.head_dim_256_backward()
  assert [mosaic_gpu.head_dim_parts(d) for d in (64, 128, 256)] == [1, 1, 2]
