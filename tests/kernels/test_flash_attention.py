"""Flash attention: the reference against XLA's attention, the layout bookkeeping against brute
force, and the Pallas GPU kernels (interpret mode on CPU) against the reference, values and
gradients of q, k, v."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.kernels.flash_attention import (
  BlockLayout,
  attention_flops,
  attention_reference,
  bigbird_layout,
  computed_blocks,
  flash_attention,
)
from effjax.kernels.flash_attention.layout import block_csr, token_mask, unmasked_blocks
from effjax.kernels.flash_attention.reference import attention_mask


def _qkv(rng, b, s, hq, hkv, d, dtype=jnp.float32):
  return [jnp.asarray(rng.standard_normal((b, s, h, d)), dtype) for h in (hq, hkv, hkv)]


def _segments(rng, b, s, *, padding: bool):
  """Sorted document ids per row (packed sequences); with padding the tail is id 0."""
  ids = np.sort(rng.integers(1, 4, size=(b, s)), axis=1)
  if padding:
    ids[:, s - rng.integers(1, s // 4) - 1:] = 0
  return jnp.asarray(ids, jnp.int32)


def _value_and_grads(fn, q, k, v, w):
  """out and d/d(q, k, v) of a random projection of out, jitted (interpret mode traces once)."""
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
  return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(
      q, k, v)


# ------------------------------------------------------------------------------------------------
# The reference against jax.nn.dot_product_attention with the equivalent explicit mask.


@pytest.mark.parametrize('case', ['causal', 'window', 'window_bidirectional', 'segments',
                                  'bigbird', 'gqa_bigbird_bidirectional'])
def test_reference_matches_xla(case):
  rng = np.random.default_rng()
  b, s, hq, hkv, d = 2, 64, 4, 2, 16
  kw = {'causal': True}
  if case == 'window':
    kw['window'] = int(rng.integers(1, 20))
  if case == 'window_bidirectional':
    kw.update(causal=False, window=int(rng.integers(1, 20)))
  if case == 'segments':
    kw['segment_ids'] = _segments(rng, b, s, padding=False)
  if case == 'bigbird':
    kw['layout'] = bigbird_layout(s, 8, local_blocks=2, global_blocks=1, random_blocks=1,
                                  seed=int(rng.integers(100)))
  if case == 'gqa_bigbird_bidirectional':
    hkv = 1
    kw.update(causal=False, layout=bigbird_layout(s, 8, local_blocks=2, global_blocks=1,
                                                  random_blocks=2, causal=False))
  q, k, v = _qkv(rng, b, s, hq, hkv, d)
  w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  mask = attention_mask(s, segment_ids=kw.get('segment_ids'), causal=kw['causal'],
                        window=kw.get('window'), layout=kw.get('layout'))
  xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='xla')
  ours = lambda q, k, v: attention_reference(q, k, v, **kw)
  out, grads = _value_and_grads(ours, q, k, v, w)
  want_out, want_grads = _value_and_grads(xla, q, k, v, w)
  np.testing.assert_allclose(out, want_out, rtol=1e-4, atol=1e-5)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_reference_empty_rows_are_zero_with_zero_grads():
  rng = np.random.default_rng()
  q, k, v = _qkv(rng, 1, 32, 2, 2, 16)
  seg = _segments(rng, 1, 32, padding=True)
  pad = np.asarray(seg[0] == 0)
  out, (dq, dk, dv) = _value_and_grads(
      lambda q, k, v: flash_attention(q, k, v, segment_ids=seg, backend='reference'), q, k, v,
      jnp.asarray(rng.standard_normal(q.shape), jnp.float32))
  assert np.all(np.asarray(out)[0, pad] == 0)
  assert np.all(np.asarray(dq)[0, pad] == 0) and np.all(np.asarray(dk)[0, pad] == 0)
  assert all(np.isfinite(np.asarray(g)).all() for g in (dq, dk, dv))


# ------------------------------------------------------------------------------------------------
# Layouts and tile bookkeeping.


@pytest.mark.parametrize('causal', [True, False])
def test_bigbird_structure(causal):
  rng = np.random.default_rng()
  n, local, glob, rand = 12, 3, 2, int(rng.integers(1, 3))
  longformer = bigbird_layout(n * 16, 16, local_blocks=local, global_blocks=glob,
                              causal=causal).array()
  i, j = np.indices((n, n))
  band = (i - j >= 0) & (i - j < local)
  if not causal:
    band |= (j - i >= 0) & (j - i < local)
  want = band | (j < glob) | (i < glob)
  if causal:
    want &= j <= i
  np.testing.assert_array_equal(longformer, want)

  layout = bigbird_layout(n * 16, 16, local_blocks=local, global_blocks=glob, random_blocks=rand,
                          seed=int(rng.integers(1000)), causal=causal)
  bigbird = layout.array()
  assert layout.block == 16 and layout.num_blocks == n
  assert np.all(bigbird[longformer])  # random blocks only add
  extra = (bigbird & ~longformer).sum(axis=1)
  available = (~longformer & ((j <= i) | (not causal))).sum(axis=1)
  np.testing.assert_array_equal(extra, np.minimum(rand, available))
  if causal:
    assert not np.any(np.triu(bigbird, 1))
  assert hash(layout) == hash(BlockLayout.from_array(16, bigbird))


def test_computed_and_unmasked_blocks_match_brute_force():
  rng = np.random.default_rng()
  for _ in range(20):
    s = 128
    bq, bk = (int(x) for x in rng.choice([8, 16, 32], size=2))
    causal = bool(rng.integers(2))
    window = int(rng.integers(1, 70)) if rng.integers(2) else None
    layout = None
    if rng.integers(2):
      lb = int(rng.choice([32, 64]))
      layout = BlockLayout.from_array(lb, rng.random((s // lb, s // lb)) < 0.5)
    tokens = token_mask(s, causal=causal, window=window, layout=layout)
    tiles = tokens.reshape(s // bq, bq, s // bk, bk)
    got = computed_blocks(s, bq, bk, causal=causal, window=window, layout=layout)
    np.testing.assert_array_equal(got, tiles.any(axis=(1, 3)))
    static = token_mask(s, causal=causal, window=window).reshape(s // bq, bq, s // bk, bk)
    np.testing.assert_array_equal(unmasked_blocks(s, bq, bk, causal=causal, window=window),
                                  static.all(axis=(1, 3)))


def test_block_csr_round_trip():
  rng = np.random.default_rng()
  blocks = rng.random((9, 7)) < 0.4
  blocks[int(rng.integers(9))] = False  # an empty row
  indices, counts = block_csr(blocks)
  assert indices.dtype == np.int32 and counts.dtype == np.int32
  assert indices.shape == (9, max(blocks.sum(axis=1).max(), 1))
  rebuilt = np.zeros_like(blocks)
  for row in range(9):
    rebuilt[row, indices[row, :counts[row]]] = True
    if counts[row]:
      assert np.all(indices[row, counts[row]:] == indices[row, counts[row] - 1])
    else:
      assert np.all(indices[row] == 0)
  np.testing.assert_array_equal(rebuilt, blocks)
  _, t_counts = block_csr(blocks.T)
  np.testing.assert_array_equal(t_counts, blocks.sum(axis=0))


def test_attention_flops():
  kw = {'block_q': 64, 'block_k': 64}
  full = attention_flops(2, 8192, 4, 128, causal=False, **kw)
  assert full == 4 * 2 * 4 * 128 * 8192 * 8192
  causal = attention_flops(2, 8192, 4, 128, causal=True, **kw)
  assert 0.5 <= causal / full < 0.51
  assert attention_flops(2, 8192, 4, 128, causal=True, backward=True, **kw) == 2.5 * causal
  window = attention_flops(2, 8192, 4, 128, causal=True, window=512, **kw)
  assert window / full < 512 / 8192 * 1.2
  layout = bigbird_layout(8192, 256, local_blocks=2, global_blocks=1)
  assert attention_flops(2, 8192, 4, 128, causal=True, layout=layout, **kw) < 0.2 * causal


# ------------------------------------------------------------------------------------------------
# The GPU kernels in interpret mode against the reference.

KERNEL_CASES = {
    # name: (B, S, Hq, Hkv, D, block_q, block_k, options)
    'causal_segments_padding_gqa': (2, 128, 4, 2, 64, 32, 32, {'segments': True, 'padding': True}),
    'window_d128_default_blocks': (1, 128, 2, 2, 128, None, None, {'window': True}),
    'window_bidirectional': (1, 128, 2, 1, 64, 32, 64, {'causal': False, 'window': True}),
    'random_blocks_bidirectional': (1, 128, 2, 2, 64, 32, 32, {'causal': False, 'random': True}),
    'bigbird_gqa': (1, 256, 4, 1, 64, 64, 32, {'bigbird': True}),
    'dense_bidirectional': (1, 64, 2, 2, 64, 32, 32, {'causal': False}),
    'causal_d256': (1, 64, 1, 1, 256, 32, 32, {}),
}


def _kernel_kwargs(rng, b, s, options):
  kw = {'causal': options.get('causal', True)}
  if options.get('segments'):
    kw['segment_ids'] = _segments(rng, b, s, padding=options.get('padding', False))
  if options.get('window'):
    kw['window'] = int(rng.integers(10, 70))
  if options.get('random'):
    blocks = rng.random((s // 64, s // 64)) < 0.5
    blocks[int(rng.integers(s // 64))] = False  # a query block with no keys at all
    kw['layout'] = BlockLayout.from_array(64, blocks)
  if options.get('bigbird'):
    kw['layout'] = bigbird_layout(s, 64, local_blocks=2, global_blocks=1, random_blocks=1,
                                  seed=int(rng.integers(100)))
  return kw


@pytest.mark.parametrize('name', list(KERNEL_CASES))
def test_triton_kernel_matches_reference(name):
  b, s, hq, hkv, d, block_q, block_k, options = KERNEL_CASES[name]
  rng = np.random.default_rng()
  kw = _kernel_kwargs(rng, b, s, options)
  q, k, v = _qkv(rng, b, s, hq, hkv, d)
  w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  kernel = lambda q, k, v: flash_attention(q, k, v, backend='triton', interpret=True,
                                           block_q=block_q, block_k=block_k, **kw)
  out, grads = _value_and_grads(kernel, q, k, v, w)
  want_out, want_grads = _value_and_grads(lambda q, k, v: attention_reference(q, k, v, **kw),
                                          q, k, v, w)
  np.testing.assert_allclose(out, want_out, rtol=1e-4, atol=2e-5)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  if options.get('padding'):
    pad = np.asarray(kw['segment_ids'] == 0)
    assert pad.any() and np.all(np.asarray(out)[pad] == 0)
    assert np.all(np.asarray(grads[0])[pad] == 0)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_triton_kernel_bfloat16():
  rng = np.random.default_rng()
  b, s, hq, hkv, d = 1, 128, 2, 1, 64
  kw = {'causal': True, 'segment_ids': _segments(rng, b, s, padding=True)}
  q, k, v = _qkv(rng, b, s, hq, hkv, d, jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  kernel = lambda q, k, v: flash_attention(q, k, v, backend='triton', interpret=True, block_q=32,
                                           block_k=32, **kw)
  out, grads = _value_and_grads(kernel, q, k, v, w)
  want_out, want_grads = _value_and_grads(lambda q, k, v: attention_reference(q, k, v, **kw),
                                          q, k, v, w)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  for got, want in zip((out, *grads), (want_out, *want_grads)):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


# ------------------------------------------------------------------------------------------------
# One-line errors.


@pytest.mark.parametrize('case, match', [
    ('head_dim', 'head_dim=96'),
    ('seq_block', 'sequence length 96 is not divisible by block_q=64'),
    ('block_pow2', 'block_q=48 must be a power of two >= 16'),
    ('layout_block', 'layout.block=32 is not a multiple of block_k=64'),
    ('heads', r'query heads \(3\) must be a multiple of key/value heads \(2\)'),
    ('dtype', 'dtype'),
])
def test_errors(case, match):
  rng = np.random.default_rng()
  s = 96 if case in ('seq_block', 'block_pow2') else 128
  q, k, v = _qkv(rng, 1, s, 2, 2, 96 if case == 'head_dim' else 64)
  kw = {'backend': 'triton', 'interpret': True}
  if case == 'seq_block':
    kw['block_q'] = 64
  if case == 'block_pow2':
    kw['block_q'] = 48
  if case == 'layout_block':
    kw.update(block_q=32, block_k=64, layout=bigbird_layout(128, 32, local_blocks=1,
                                                            global_blocks=1))
  if case == 'heads':
    q = jnp.concatenate([q, q[:, :, :1]], axis=2)
  if case == 'dtype':
    q, k, v = (x.astype(jnp.int32) for x in (q, k, v))
  with pytest.raises(ValueError, match=match) as info:
    flash_attention(q, k, v, **kw)
  assert '\n' not in str(info.value)


def test_triton_forward_logsumexp():
  """The saved lse matches the reference's, EMPTY_ROW_LSE on queries with no key included."""
  from effjax.kernels.flash_attention import gpu
  from effjax.kernels.flash_attention.reference import attention_reference_with_lse
  rng = np.random.default_rng()
  b, s, hq, hkv, d = 1, 64, 2, 1, 64
  seg = _segments(rng, b, s, padding=True)
  q, k, v = _qkv(rng, b, s, hq, hkv, d, jnp.float16)
  blocks = computed_blocks(s, 32, 16, causal=True)
  out, lse = jax.jit(lambda q, k, v, seg: gpu.fwd(
      q, k, v, seg, causal=True, window=None, blocks=blocks, scale=0.3, block_q=32, block_k=16,
      interpret=True))(q, k, v, seg)
  want_out, want_lse = attention_reference_with_lse(q, k, v, segment_ids=seg, scale=0.3)
  assert out.dtype == jnp.float16 and lse.dtype == jnp.float32 and lse.shape == (b, hq, s)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want_out, np.float32),
                             atol=2e-3)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-4)


def test_triton_kernels_lower_to_valid_triton_modules(monkeypatch, capfd):
  """Forward and both backward kernels lowered for CUDA on this CPU machine (causal, segment ids,
  a window, bf16): every Triton module verifies (tests/kernels/triton_lowering.py)."""
  from effjax.kernels.flash_attention import gpu as fa_gpu
  from tests.kernels.triton_lowering import assert_verified, triton_dump
  q = jax.ShapeDtypeStruct((1, 256, 4, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((1, 256), jnp.int32)

  def fwd_bwd(q, k, v, seg):
    attend = lambda q, k, v: flash_attention(q, k, v, segment_ids=seg, window=96,
                                             backend='triton')
    out, pullback = jax.vjp(attend, q, k, v)
    return pullback(out)

  assert_verified(triton_dump(monkeypatch, capfd, fa_gpu, fwd_bwd, q, kv, kv, seg), 3)
