"""The Mosaic TPU attention kernels (run on CPU in TPU interpret mode) against the jnp reference.

Forward out and logsumexp, and dq / dk / dv against jax.vjp of the reference, for the causal,
segment-id (with padding), sliding-window, block-sparse and grouped-query cases; plus checks that
the tile schedule visits exactly the computed tiles and that skipped tiles are never read.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.kernels.flash_attention import flash_attention, tpu
from effjax.kernels.flash_attention.layout import (BlockLayout, bigbird_layout, block_csr,
                                                   computed_blocks, token_mask)
from effjax.kernels.flash_attention.reference import (attention_reference,
                                                      attention_reference_with_lse)


def _inputs(rng, batch, seq_len, q_heads, kv_heads, head_dim, dtype=jnp.float32):
  def draw(heads):
    return jnp.asarray(rng.standard_normal((batch, seq_len, heads, head_dim)), dtype)
  return draw(q_heads), draw(kv_heads), draw(kv_heads), draw(q_heads)  # q, k, v, d_out


def _packed_segments(rng, batch, seq_len):
  """[B, S] ids: a few documents of random lengths, then padding (id 0) of at least one block."""
  ids = np.zeros((batch, seq_len), np.int32)
  for row in range(batch):
    used = int(rng.integers(seq_len // 3, seq_len - 128))
    cuts = np.sort(rng.choice(np.arange(1, used), size=2, replace=False))
    ids[row, :used] = 1 + np.searchsorted(cuts, np.arange(used), side='right')
    ids[row, int(rng.integers(0, used))] = 0  # a padding token inside a document
  return jnp.asarray(ids)


def _check(q, k, v, d_out, *, segment_ids=None, causal=True, window=None, layout=None,
           block_q=128, block_k=128, tol=1e-4, ref_inputs=None):
  """Kernel forward/backward vs the reference (on ref_inputs, default the same arrays)."""
  seq_len = q.shape[1]
  blocks = computed_blocks(seq_len, block_q, block_k, causal=causal, window=window, layout=layout)
  static = dict(causal=causal, window=window, blocks=blocks, scale=None, block_q=block_q,
                block_k=block_k, interpret=True)
  out, lse = tpu.fwd(q, k, v, segment_ids, **static)
  dq, dk, dv = tpu.bwd(q, k, v, segment_ids, out, lse, d_out, **static)

  rq, rk, rv, rdo = [x.astype(jnp.float32) for x in (ref_inputs or (q, k, v, d_out))]
  spec = dict(segment_ids=segment_ids, causal=causal, window=window, layout=layout)
  ref_out, ref_lse = attention_reference_with_lse(rq, rk, rv, **spec)
  _, vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, **spec), rq, rk, rv)
  ref_grads = vjp(rdo)

  assert out.dtype == q.dtype and out.shape == q.shape
  assert lse.dtype == jnp.float32 and lse.shape == (q.shape[0], q.shape[2], seq_len)
  np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, rtol=tol, atol=tol)
  np.testing.assert_allclose(lse, ref_lse, rtol=tol, atol=tol)
  for name, got, want, like in zip('qkv', (dq, dk, dv), ref_grads, (q, k, v)):
    assert got.dtype == like.dtype and got.shape == like.shape, name
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tol, atol=tol,
                               err_msg=f'd{name}')


def test_causal():
  q, k, v, do = _inputs(np.random.default_rng(), 2, 256, 2, 2, 64)
  _check(q, k, v, do, causal=True)


def test_causal_segments_with_padding_gqa():
  rng = np.random.default_rng()
  q, k, v, do = _inputs(rng, 2, 256, 2, 1, 128)
  segment_ids = _packed_segments(rng, 2, 256)
  _check(q, k, v, do, segment_ids=segment_ids, causal=True)


def test_sliding_window_gqa():
  # 160 is no multiple of 128: the window's edge cuts through tiles, and far tiles are skipped.
  q, k, v, do = _inputs(np.random.default_rng(), 1, 384, 4, 2, 64)
  _check(q, k, v, do, causal=True, window=160)


def test_bidirectional_window_rectangular_tiles():
  q, k, v, do = _inputs(np.random.default_rng(), 1, 512, 2, 2, 64)
  _check(q, k, v, do, causal=False, window=100, block_q=128, block_k=256)


def test_bigbird_layout_with_segments():
  rng = np.random.default_rng()
  layout = bigbird_layout(512, 128, local_blocks=2, global_blocks=1, random_blocks=1,
                          seed=int(rng.integers(1 << 30)), causal=True)
  q, k, v, do = _inputs(rng, 1, 512, 2, 1, 64)
  _check(q, k, v, do, segment_ids=_packed_segments(rng, 1, 512), causal=True, layout=layout)


def test_random_block_mask_never_reads_skipped_tiles():
  """NaN in key blocks no query uses, and in a query block that uses no key, must not leak."""
  rng = np.random.default_rng()
  n = 4
  mask = rng.random((n, n)) < 0.6
  empty_row, empty_col = rng.choice(n, size=2, replace=False)
  mask[empty_row] = False
  mask[:, empty_col] = False
  mask[empty_col, empty_col] = False
  for row in range(n):  # keep the other rows non-empty so there is something to compare
    if row != empty_row and not mask[row].any():
      mask[row, (empty_col + 1) % n] = True
  layout = BlockLayout.from_array(128, mask)
  clean = _inputs(rng, 1, 128 * n, 2, 2, 128)

  def poison(x, block):
    return x.at[:, block * 128:(block + 1) * 128].set(jnp.nan)
  q, k, v, do = clean
  q, do = poison(q, empty_row), poison(do, empty_row)
  k, v = poison(k, empty_col), poison(v, empty_col)
  _check(q, k, v, do, causal=False, layout=layout, ref_inputs=clean)


def test_bfloat16_loose():
  rng = np.random.default_rng()
  q, k, v, do = _inputs(rng, 1, 256, 4, 2, 128, jnp.bfloat16)
  _check(q, k, v, do, segment_ids=_packed_segments(rng, 1, 256), causal=True, window=200,
         tol=3e-2)


def test_through_public_op_under_jit():
  """flash_attention(backend='mosaic') jit-compiles and its custom VJP uses these kernels."""
  from effjax.kernels.flash_attention import flash_attention
  rng = np.random.default_rng()
  q, k, v, do = _inputs(rng, 1, 256, 2, 1, 64)

  def loss(attend, q, k, v):
    return jnp.sum(attend(q, k, v) * do)
  kernel = functools.partial(flash_attention, causal=True, window=200, backend='mosaic',
                             interpret=True)
  reference = functools.partial(attention_reference, causal=True, window=200)
  got = jax.jit(jax.value_and_grad(functools.partial(loss, kernel), argnums=(0, 1, 2)))(q, k, v)
  want = jax.value_and_grad(functools.partial(loss, reference), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('causal,window,block_q,block_k', [
    (True, None, 128, 128), (True, 300, 128, 256), (False, 200, 256, 128)])
def test_schedule_visits_exactly_the_computed_tiles(causal, window, block_q, block_k):
  """Grid steps that run the body (j < count) are the True tiles, each once, in both directions."""
  seq_len = 1024
  rng = np.random.default_rng()
  layout = BlockLayout.from_array(256, rng.random((4, 4)) < 0.7)
  blocks = computed_blocks(seq_len, block_q, block_k, causal=causal, window=window, layout=layout)
  needs_mask = tpu.tile_needs_mask(seq_len, block_q, block_k, causal=causal, window=window)
  rule_mask = token_mask(seq_len, causal=causal, window=window)
  for grid, partial in ((blocks, needs_mask), (blocks.T, needs_mask.T)):
    indices, counts, masked = tpu.row_schedule(grid, partial)
    visited = [(r, int(indices[r, j])) for r in range(grid.shape[0]) for j in range(counts[r])]
    assert len(visited) == int(grid.sum()) == int(counts.sum())
    assert sorted(visited) == sorted(zip(*np.nonzero(grid)))
    for r in range(grid.shape[0]):  # padding repeats the last visited tile: no new fetch
      if counts[r]:
        assert (indices[r, counts[r]:] == indices[r, counts[r] - 1]).all()
      np.testing.assert_array_equal(masked[r], partial[r, indices[r]])
  # A tile flagged unmasked really has every pair allowed by the causal / window rules.
  tiles = rule_mask.reshape(seq_len // block_q, block_q, seq_len // block_k, block_k)
  np.testing.assert_array_equal(~needs_mask, tiles.all(axis=(1, 3)))
  assert block_csr(blocks)[0].shape[1] == max(int(blocks.sum(axis=1).max()), 1)


def test_block_size_must_be_multiple_of_128():
  q, k, v, _ = _inputs(np.random.default_rng(), 1, 256, 2, 2, 64)
  with pytest.raises(ValueError, match='multiple of 128'):
    tpu.fwd(q, k, v, None, causal=True, window=None, blocks=None, scale=None, block_q=64,
            block_k=128, interpret=True)


def test_lowers_to_mosaic():
  """The three kernels pass Pallas' Mosaic lowering (block-shape rules, op support) from CPU."""
  seq_len, block_q, block_k = 512, 256, 128
  q = jax.ShapeDtypeStruct((1, seq_len, 4, 64), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, seq_len, 2, 64), jnp.bfloat16)
  segment_ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  static = dict(causal=True, window=300, scale=None, block_q=block_q, block_k=block_k,
                blocks=computed_blocks(seq_len, block_q, block_k, causal=True, window=300),
                interpret=False)

  def fwd_bwd(q, k, v, segment_ids, d_out):
    out, lse = tpu.fwd(q, k, v, segment_ids, **static)
    return tpu.bwd(q, k, v, segment_ids, out, lse, d_out, **static)
  lowered = jax.jit(fwd_bwd).trace(q, k, k, segment_ids, q).lower(lowering_platforms=('tpu',))
  assert lowered.as_text().count('tpu_custom_call') == 3


def test_public_op_names_the_mosaic_block_constraint():
  q, k, v, _ = _inputs(np.random.default_rng(), 1, 256, 2, 2, 64)
  with pytest.raises(ValueError, match="block_q=64 must be a multiple of 128 for backend='mosaic'"):
    flash_attention(q, k, v, backend='mosaic', block_q=64, block_k=128, interpret=True)
