"""Block-sparse flash attention as Pallas kernels for the Triton lowering (GPU).

Algorithm. The forward pass runs one program per (query block, batch x query head). The program
keeps its [block_q, D] query tile resident and walks a list of key blocks, doing an online
softmax in float32: a running row max m, a running sum l and an accumulator rescaled by
exp(m_old - m_new) whenever the max grows. It writes out = acc / l (q's dtype) and the row
logsumexp lse = m + log(l) (float32 [B, Hq, S]). Exponentials use exp2 with the scores scaled by
log2(e), the cheaper instruction; lse is stored in natural-log units.

The backward pass recomputes the probabilities tile by tile as p = exp(s - lse), with
delta = rowsum(out * d_out) precomputed in plain JAX, and runs two kernels:
  dK/dV: one program per (key block, batch x kv head); it walks the query blocks that see its key
    block, for every query head of its group, accumulating dv += p^T do and dk += ds^T q with
    ds = p * (do v^T - delta). Summing the group inside the kernel keeps the k/v tiles and both
    accumulators resident and writes dk, dv directly with Hkv heads (no [B, S, Hq, D] float32
    temporaries and no extra reduction pass).
  dQ: one program per (query block, batch x query head) walking its key blocks: dq += ds k.
Tiles in the backward pass are at most 64 x 64 (finer than the forward's default 128 x 64): a
backward program holds several more tiles live, and finer tiles skip masked work more tightly.

Tables. `blocks` (layout.computed_blocks) marks the tiles holding at least one allowed pair; fully
masked tiles are never visited. Each kernel receives static int32 CSR tables (layout.block_csr):
per row (a query block, or a key block for the transposed lists of dK/dV) the column indices to
visit and their count. The count is read with a scalar load and drives a lax.fori_loop; each step
reads its block index with another scalar load and slices k/v (or q/do) with pl.ds.

Masking. Tiles come in two lists: full tiles, where every (query, key) pair is allowed by the
causal and window rules (layout.unmasked_blocks; a layout is constant on a tile so it never makes
a tile partial), and partial tiles on the causal / window boundary. The two lists run as two loops,
and only the second builds a token mask, so the bulk of the work carries no masking cost and no
data-dependent branch sits inside a pipelined loop. Segment ids are data, so with segment ids
every tile is partial. Masked scores become -inf; the running max starts at a finite -1e30 so
exp2(m_old - m_new) never evaluates inf - inf and masked entries give exactly 0. A query with no
allowed key ends with l = 0: it writes out = 0 and lse = EMPTY_ROW_LSE (finite, huge), which makes
every recomputed p of that row 0 in the backward pass, hence zero gradients.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from effjax.kernels.flash_attention.layout import (
  block_csr,
  computed_blocks,
  retile,
  unmasked_blocks,
)
from effjax.kernels.flash_attention.reference import EMPTY_ROW_LSE

# The Triton compiler-params class has been `CompilerParams` since JAX 0.7; older releases called
# it TritonCompilerParams.
_CompilerParams = getattr(plgpu, 'CompilerParams', None) or plgpu.TritonCompilerParams

_LOG2E = math.log2(math.e)
_M_INIT = -1e30  # finite start of the running max, see the module docstring
_BWD_MAX_BLOCK = 64


def default_blocks(head_dim: int) -> tuple[int, int]:
  """(block_q, block_k) of the forward pass; 256-wide heads need smaller tiles to fit registers.

  128 x 128 measured fastest of 128x64, 128x128, 64x64 and 64x128 (causal B4 S4096 H16 D128 bf16
  on an H100: 276 vs 242, 197 and 173 TFLOP/s).
  """
  return (128, 128) if head_dim <= 128 else (64, 32)


def _compiler_params(head_dim: int, itemsize: int, *, forward: bool):
  # A third pipeline stage pays off in the forward pass when two k/v tiles per stage stay small
  # in shared memory (2-byte inputs, D <= 128); the backward holds more tiles and keeps two.
  stages = 3 if forward and itemsize <= 2 and head_dim <= 128 else 2
  # Backward with 64 x 64 tiles: 4 warps beat 8 at D=128 by 1.9x (causal B4 S4096 H16, H100:
  # 305 vs 163 TFLOP/s forward+backward; experiments/attention_kernels/bwd_sweep.py).
  if forward:
    warps = 4 if head_dim <= 64 else 8
  else:
    warps = 4 if head_dim <= 128 else 8
  return _CompilerParams(num_warps=warps, num_stages=stages)


def _dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
  """2-D matmul with float32 accumulation; transposes are folded into the contraction."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _tile_mask(q_start, k_start, block_q: int, block_k: int, causal: bool, window: int | None,
               seg_q, seg_k):
  """[block_q, block_k] bool of allowed pairs on a boundary tile (the reference.py rules)."""
  rows = q_start + jnp.arange(block_q, dtype=jnp.int32)[:, None]
  cols = k_start + jnp.arange(block_k, dtype=jnp.int32)[None, :]
  ok = jnp.ones((block_q, block_k), dtype=jnp.bool_)
  if causal:
    ok = ok & (cols <= rows)
  if window is not None:
    ok = ok & (rows - cols < window)
    if not causal:
      ok = ok & (cols - rows < window)
  if seg_q is not None:
    ok = ok & (seg_q[:, None] == seg_k[None, :]) & (seg_k[None, :] > 0)
  return ok


def _tables(blocks: np.ndarray, seq_len: int, block_q: int, block_k: int, *, causal: bool,
            window: int | None, has_segments: bool, transpose: bool):
  """CSR tables (full_idx, full_cnt, part_idx, part_cnt) and whether each list is non-empty."""
  blocks = np.asarray(blocks, dtype=bool)
  if has_segments:
    full = np.zeros_like(blocks)
  else:
    full = blocks & unmasked_blocks(seq_len, block_q, block_k, causal=causal, window=window)
  partial = blocks & ~full
  if transpose:
    full, partial = full.T, partial.T
  full_idx, full_cnt = block_csr(full)
  part_idx, part_cnt = block_csr(partial)
  tables = [jnp.asarray(x) for x in (full_idx, full_cnt, part_idx, part_cnt)]
  return tables, bool(full.any()), bool(partial.any())


def _whole(array):
  """BlockSpec handing every program the whole (small) array: the CSR tables."""
  return pl.BlockSpec(array.shape, lambda *_: (0,) * array.ndim)


# ----------------------------------------------------------------------------------------------
# Forward


def _fwd_kernel(full_idx_ref, full_cnt_ref, part_idx_ref, part_cnt_ref, q_ref, k_ref, v_ref,
                *refs, scale, causal, window, block_q, block_k, has_segments, has_full,
                has_partial):
  seg_ref, out_ref, lse_ref = refs if has_segments else (None, *refs)
  qi = pl.program_id(0)
  q_start = qi * block_q
  q = q_ref[...]
  seg_q = seg_ref[pl.ds(q_start, block_q)] if has_segments else None
  qk_scale = scale * _LOG2E

  def walk(idx_ref, masked):
    def step(t, carry):
      acc, m, l = carry
      k_start = pl.multiple_of(idx_ref[qi, t] * block_k, block_k)
      k = k_ref[pl.ds(k_start, block_k), :]
      v = v_ref[pl.ds(k_start, block_k), :]
      s = _dot(q, k, trans_b=True) * qk_scale
      if masked:
        seg_k = seg_ref[pl.ds(k_start, block_k)] if has_segments else None
        allowed = _tile_mask(q_start, k_start, block_q, block_k, causal, window, seg_q, seg_k)
        s = jnp.where(allowed, s, -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      alpha = jnp.exp2(m - m_new)
      p = jnp.exp2(s - m_new[:, None])
      l = l * alpha + jnp.sum(p, axis=1)
      acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
      return acc, m_new, l
    return step

  carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((block_q,), _M_INIT, jnp.float32),
           jnp.zeros((block_q,), jnp.float32))
  if has_full:
    carry = lax.fori_loop(0, full_cnt_ref[qi], walk(full_idx_ref, False), carry)
  if has_partial:
    carry = lax.fori_loop(0, part_cnt_ref[qi], walk(part_idx_ref, True), carry)
  acc, m, l = carry
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  out_ref[...] = (acc / l_safe[:, None]).astype(out_ref.dtype)
  lse_ref[...] = jnp.where(empty, EMPTY_ROW_LSE, (m + jnp.log2(l_safe)) / _LOG2E)


def fwd(q, k, v, segment_ids, *, causal: bool, window: int | None, blocks: np.ndarray,
        scale: float, block_q: int, block_k: int, interpret: bool):
  """(out [B, S, Hq, D] in q.dtype, lse float32 [B, Hq, S]) visiting only the `blocks` tiles."""
  b, s, hq, d = q.shape
  hkv = k.shape[2]
  groups = hq // hkv
  has_segments = segment_ids is not None
  tables, has_full, has_partial = _tables(blocks, s, block_q, block_k, causal=causal,
                                          window=window, has_segments=has_segments,
                                          transpose=False)
  kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, window=window,
                             block_q=block_q, block_k=block_k, has_segments=has_segments,
                             has_full=has_full, has_partial=has_partial)
  # Grid axis 0 (query blocks) varies fastest, so neighbouring programs share one head's k/v.
  q_spec = pl.BlockSpec((None, block_q, None, d),
                        lambda i, bh: (lax.div(bh, hq), i, lax.rem(bh, hq), 0))
  kv_spec = pl.BlockSpec((None, s, None, d),
                         lambda i, bh: (lax.div(bh, hq), 0, lax.div(lax.rem(bh, hq), groups), 0))
  in_specs = [_whole(t) for t in tables] + [q_spec, kv_spec, kv_spec]
  inputs = [*tables, q, k, v]
  if has_segments:
    in_specs.append(pl.BlockSpec((None, s), lambda i, bh: (lax.div(bh, hq), 0)))
    inputs.append(segment_ids.astype(jnp.int32))
  lse_spec = pl.BlockSpec((None, None, block_q),
                          lambda i, bh: (lax.div(bh, hq), lax.rem(bh, hq), i))
  out, lse = pl.pallas_call(
      kernel,
      grid=(s // block_q, b * hq),
      in_specs=in_specs,
      out_specs=[q_spec, lse_spec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, hq, s), jnp.float32)],
      compiler_params=_compiler_params(d, q.dtype.itemsize, forward=True),
      interpret=interpret,
      name='flash_attention_fwd',
  )(*inputs)
  return out, lse


# ----------------------------------------------------------------------------------------------
# Backward


def _dkv_kernel(full_idx_ref, full_cnt_ref, part_idx_ref, part_cnt_ref, q_ref, k_ref, v_ref,
                do_ref, lse_ref, delta_ref, *refs, scale, causal, window, block_q, block_k,
                groups, has_segments, has_full, has_partial):
  seg_ref, dk_ref, dv_ref = refs if has_segments else (None, *refs)
  kj = pl.program_id(0)
  k_start = kj * block_k
  k = k_ref[...]
  v = v_ref[...]
  seg_k = seg_ref[pl.ds(k_start, block_k)] if has_segments else None
  qk_scale = scale * _LOG2E

  def walk(idx_ref, masked, g):
    def step(t, carry):
      dk, dv = carry
      q_start = pl.multiple_of(idx_ref[kj, t] * block_q, block_q)
      rows = pl.ds(q_start, block_q)
      q = q_ref[rows, g, :]
      do = do_ref[rows, g, :]
      lse = lse_ref[g, rows] * _LOG2E
      delta = delta_ref[g, rows]
      s = _dot(q, k, trans_b=True) * qk_scale
      if masked:
        seg_q = seg_ref[rows] if has_segments else None
        allowed = _tile_mask(q_start, k_start, block_q, block_k, causal, window, seg_q, seg_k)
        s = jnp.where(allowed, s, -jnp.inf)
      p = jnp.exp2(s - lse[:, None])
      dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
      ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
      dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
      return dk, dv
    return step

  def one_head(g, carry):
    if has_full:
      carry = lax.fori_loop(0, full_cnt_ref[kj], walk(full_idx_ref, False, g), carry)
    if has_partial:
      carry = lax.fori_loop(0, part_cnt_ref[kj], walk(part_idx_ref, True, g), carry)
    return carry

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, groups, one_head, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(full_idx_ref, full_cnt_ref, part_idx_ref, part_cnt_ref, q_ref, k_ref, v_ref,
               do_ref, lse_ref, delta_ref, *refs, scale, causal, window, block_q, block_k,
               has_segments, has_full, has_partial):
  seg_ref, dq_ref = refs if has_segments else (None, *refs)
  qi = pl.program_id(0)
  q_start = qi * block_q
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...] * _LOG2E
  delta = delta_ref[...]
  seg_q = seg_ref[pl.ds(q_start, block_q)] if has_segments else None
  qk_scale = scale * _LOG2E

  def walk(idx_ref, masked):
    def step(t, dq):
      k_start = pl.multiple_of(idx_ref[qi, t] * block_k, block_k)
      k = k_ref[pl.ds(k_start, block_k), :]
      v = v_ref[pl.ds(k_start, block_k), :]
      s = _dot(q, k, trans_b=True) * qk_scale
      if masked:
        seg_k = seg_ref[pl.ds(k_start, block_k)] if has_segments else None
        allowed = _tile_mask(q_start, k_start, block_q, block_k, causal, window, seg_q, seg_k)
        s = jnp.where(allowed, s, -jnp.inf)
      p = jnp.exp2(s - lse[:, None])
      ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
      return dq + _dot(ds.astype(k.dtype), k)
    return step

  dq = jnp.zeros(q.shape, jnp.float32)
  if has_full:
    dq = lax.fori_loop(0, full_cnt_ref[qi], walk(full_idx_ref, False), dq)
  if has_partial:
    dq = lax.fori_loop(0, part_cnt_ref[qi], walk(part_idx_ref, True), dq)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def bwd(q, k, v, segment_ids, out, lse, d_out, *, causal: bool, window: int | None,
        blocks: np.ndarray, scale: float, block_q: int, block_k: int, interpret: bool):
  """(dq, dk, dv) in the input dtypes; dk, dv already summed over each kv head's query group."""
  b, s, hq, d = q.shape
  hkv = k.shape[2]
  groups = hq // hkv
  has_segments = segment_ids is not None
  bq, bk = min(block_q, _BWD_MAX_BLOCK), min(block_k, _BWD_MAX_BLOCK)
  blocks = retile(blocks, s, block_q, block_k, bq, bk, causal=causal, window=window)
  delta = jnp.einsum('bshd,bshd->bhs', out.astype(jnp.float32), d_out.astype(jnp.float32))
  d_out = d_out.astype(q.dtype)
  static = {'scale': scale, 'causal': causal, 'window': window, 'block_q': bq, 'block_k': bk,
                'has_segments': has_segments}
  segments = [segment_ids.astype(jnp.int32)] if has_segments else []

  # dK / dV: programs over (key block, batch x kv head), each reading its whole query group.
  tables, has_full, has_partial = _tables(blocks, s, bq, bk, causal=causal, window=window,
                                          has_segments=has_segments, transpose=True)
  group_spec = pl.BlockSpec((None, s, groups, d), lambda j, bh: (lax.div(bh, hkv), 0,
                                                                 lax.rem(bh, hkv), 0))
  group_rows_spec = pl.BlockSpec((None, groups, s),
                                 lambda j, bh: (lax.div(bh, hkv), lax.rem(bh, hkv), 0))
  kv_tile_spec = pl.BlockSpec((None, bk, None, d),
                              lambda j, bh: (lax.div(bh, hkv), j, lax.rem(bh, hkv), 0))
  in_specs = ([_whole(t) for t in tables] +
              [group_spec, kv_tile_spec, kv_tile_spec, group_spec, group_rows_spec,
               group_rows_spec])
  if has_segments:
    in_specs.append(pl.BlockSpec((None, s), lambda j, bh: (lax.div(bh, hkv), 0)))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, groups=groups, has_full=has_full, has_partial=has_partial,
                        **static),
      grid=(s // bk, b * hkv),
      in_specs=in_specs,
      out_specs=[kv_tile_spec, kv_tile_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_compiler_params(d, q.dtype.itemsize, forward=False),
      interpret=interpret,
      name='flash_attention_bwd_dkv',
  )(*tables, q, k, v, d_out, lse, delta, *segments)

  # dQ: programs over (query block, batch x query head), walking their key blocks.
  tables, has_full, has_partial = _tables(blocks, s, bq, bk, causal=causal, window=window,
                                          has_segments=has_segments, transpose=False)
  q_tile_spec = pl.BlockSpec((None, bq, None, d),
                             lambda i, bh: (lax.div(bh, hq), i, lax.rem(bh, hq), 0))
  kv_spec = pl.BlockSpec((None, s, None, d),
                         lambda i, bh: (lax.div(bh, hq), 0, lax.div(lax.rem(bh, hq), groups), 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, bh: (lax.div(bh, hq), lax.rem(bh, hq), i))
  in_specs = ([_whole(t) for t in tables] +
              [q_tile_spec, kv_spec, kv_spec, q_tile_spec, row_spec, row_spec])
  if has_segments:
    in_specs.append(pl.BlockSpec((None, s), lambda i, bh: (lax.div(bh, hq), 0)))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, has_full=has_full, has_partial=has_partial, **static),
      grid=(s // bq, b * hq),
      in_specs=in_specs,
      out_specs=q_tile_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(d, q.dtype.itemsize, forward=False),
      interpret=interpret,
      name='flash_attention_bwd_dq',
  )(*tables, q, k, v, d_out, lse, delta, *segments)
  return dq, dk, dv
