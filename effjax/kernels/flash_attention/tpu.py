"""Block-sparse flash attention for TPU (Pallas Mosaic): forward and backward kernels.

Every kernel walks a compressed list of tiles instead of the full [S/block_q, S/block_k] grid. The
lists come from `blocks` (layout.computed_blocks) through layout.block_csr and reach the kernels as
scalar-prefetch tables in SMEM; the key/value BlockSpec index_maps read the tile index from them,
so a fully masked tile is neither fetched from HBM nor computed. The last grid axis has the length
of the longest row; a row's extra steps repeat its last tile index (the pipeline sees an unchanged
block and issues no DMA) and the body is skipped with pl.when.

Masks: a layout cell always covers whole tiles (its block is a multiple of the tile sizes), so the
layout is fully expressed by which tiles are visited. Within a visited tile only the causal and
window rules can cut through; a third table flags those partial tiles, and only they (or every
tile, when segment ids are given) build a token mask from iota. A query row with no allowed key
outputs 0 and stores lse = EMPTY_ROW_LSE, so the backward's recomputed exp(s - lse) is exactly 0.

Kernels:
  forward  grid (B, Hq, q blocks, key-block list): online softmax in float32 VMEM scratch.
  dQ       grid (B, Hq, q blocks, key-block list): recomputes p = exp(s - lse).
  dK, dV   grid (B, Hkv, key blocks, group x q-block list) from block_csr(blocks.T): the last axis
           runs over the Hq // Hkv query heads of the key/value head and, for each, the q blocks
           that see this key block, so the grouped-query sum happens in the VMEM accumulator.

Mosaic layout choices: arrays are moved to head-major [B, H, S, D] so every block's last two dims
are (block, head_dim) with head_dim the full dim (D = 64 would not be a legal lane slice of a
fused H * D axis). The running max m and sum l are [block_q, 128] lane-broadcast scratch (the
shape Mosaic vector ops like). Per-token vectors (lse, delta, segment ids) live in HBM as rows
[B, H, 1, S] / [B, 1, S], free reshapes of [B, H, S] that avoid padding a trailing unit dim to
128 lanes; kernels that need a column turn the [1, block] row into [block, 1] in VMEM, and the
forward writes its lse row by transposing the lane-broadcast [block_q, 128] value.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from effjax.kernels.flash_attention.layout import block_csr, computed_blocks
from effjax.kernels.flash_attention.reference import EMPTY_ROW_LSE

LANES = 128
# Finite stand-in for -inf in the running max: no inf - inf = NaN when a row is fully masked.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_NT = (((1,), (1,)), ((), ()))  # a [m, d] x b [n, d] -> [m, n]
_NN = (((1,), (0,)), ((), ()))  # a [m, k] x b [k, n] -> [m, n]


def default_blocks(head_dim: int) -> tuple[int, int]:
  """(block_q, block_k): 128 x 128 tiles fit VMEM comfortably for every supported head dim."""
  del head_dim
  return 128, 128


# ----------------------------------------------------------------------------- tile schedule


def tile_needs_mask(seq_len: int, block_q: int, block_k: int, *, causal: bool,
                    window: int | None) -> np.ndarray:
  """[S/block_q, S/block_k] bool: True where causal / window rules mask some pair of the tile."""
  q0 = np.arange(seq_len // block_q)[:, None] * block_q
  q1 = q0 + block_q - 1
  k0 = np.arange(seq_len // block_k)[None, :] * block_k
  k1 = k0 + block_k - 1
  full = np.ones((q0.shape[0], k0.shape[1]), dtype=bool)
  if causal:
    full &= k1 <= q0  # every key precedes every query
  if window is not None:
    full &= q1 - k0 < window  # the farthest pair behind is inside the window
    if not causal:
      full &= k1 - q0 < window  # and so is the farthest pair ahead
  return ~full


def row_schedule(blocks: np.ndarray, needs_mask: np.ndarray):
  """(indices [n, W], counts [n], masked [n, W]) int32: each row's tiles and its partial flags."""
  indices, counts = block_csr(blocks)
  masked = np.take_along_axis(needs_mask, indices, axis=1).astype(np.int32)
  return indices, counts, masked


# ----------------------------------------------------------------------------- kernel pieces


def _lane_tile(x: jax.Array, width: int) -> jax.Array:
  """A [rows, 128] lane-broadcast value as [rows, width] (tiling, not lane broadcasts)."""
  if width <= LANES:
    return x[:, :width]
  return jnp.tile(x, (1, width // LANES))


def _column(row_ref) -> jax.Array:
  """A [1, n] row block as an [n, 1] column value."""
  return jnp.expand_dims(row_ref[0], -1)


def _token_mask(q_pos, k_pos, q_seg, k_seg, *, causal: bool, window: int | None):
  """Allowed (query, key) pairs; q_pos / k_pos are full-tile iotas, segments broadcast."""
  mask = jnp.ones(q_pos.shape, dtype=jnp.bool_)
  if causal:
    mask &= k_pos <= q_pos
  if window is not None:
    mask &= q_pos - window < k_pos
    if not causal:
      mask &= k_pos - window < q_pos
  if q_seg is not None:
    mask &= (q_seg == k_seg) & (k_seg > 0)
  return mask


def _visit(active, masked_ref, entry, segmented: bool, step) -> None:
  """Run step(masked) for an active entry, building the token mask only where it matters."""
  if segmented:
    pl.when(active)(lambda: step(True))
    return
  partial = masked_ref[entry] != 0
  pl.when(jnp.logical_and(active, partial))(lambda: step(True))
  pl.when(jnp.logical_and(active, jnp.logical_not(partial)))(lambda: step(False))


def _fwd_kernel(idx_ref, cnt_ref, msk_ref, *refs, scale, causal, window, width, segmented):
  if segmented:
    qseg_ref, kseg_ref, *refs = refs
  q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
  i, j = pl.program_id(2), pl.program_id(3)
  entry = i * width + j
  block_q, block_k = q_ref.shape[0], k_ref.shape[0]
  head_dim = acc_sc.shape[1]

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, _MASK_VALUE, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  def step(masked: bool):
    v = v_ref[...]
    s = lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32) * scale
    if masked:
      q_pos = i * block_q + lax.broadcasted_iota(jnp.int32, s.shape, 0)
      k_pos = idx_ref[entry] * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
      mask = _token_mask(q_pos, k_pos, _column(qseg_ref) if segmented else None,
                         kseg_ref[...] if segmented else None, causal=causal, window=window)
      s = jnp.where(mask, s, _MASK_VALUE)
    m_prev = m_sc[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp(s - _lane_tile(m_next, block_k))
    if masked:  # a fully masked row has m == _MASK_VALUE and exp(0) = 1 here
      p = jnp.where(mask, p, 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    m_sc[...] = m_next
    pv = lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
    acc_sc[...] = _lane_tile(alpha, head_dim) * acc_sc[...] + pv

  _visit(j < cnt_ref[i], msk_ref, entry, segmented, step)

  @pl.when(j == width - 1)
  def _finish():
    l = l_sc[...]
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    inv = jnp.where(empty, 0.0, 1.0 / l_safe)
    o_ref[...] = (acc_sc[...] * _lane_tile(inv, head_dim)).astype(o_ref.dtype)
    lse = jnp.where(empty, EMPTY_ROW_LSE, m_sc[...] + jnp.log(l_safe))
    lse_ref[...] = lse.T[:1, :]  # [block_q, 128] lane-broadcast -> [1, block_q] row


def _dq_kernel(idx_ref, cnt_ref, msk_ref, *refs, scale, causal, window, width, segmented):
  if segmented:
    qseg_ref, kseg_ref, *refs = refs
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc = refs
  i, j = pl.program_id(2), pl.program_id(3)
  entry = i * width + j
  block_q, block_k = q_ref.shape[0], k_ref.shape[0]

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  def step(masked: bool):
    k = k_ref[...]
    s = lax.dot_general(q_ref[...], k, _NT, preferred_element_type=jnp.float32) * scale
    p = jnp.exp(s - _column(lse_ref))
    if masked:
      q_pos = i * block_q + lax.broadcasted_iota(jnp.int32, s.shape, 0)
      k_pos = idx_ref[entry] * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
      mask = _token_mask(q_pos, k_pos, _column(qseg_ref) if segmented else None,
                         kseg_ref[...] if segmented else None, causal=causal, window=window)
      p = jnp.where(mask, p, 0.0)
    dp = lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - _column(delta_ref))
    dq_sc[...] += lax.dot_general(ds.astype(k.dtype), k, _NN, preferred_element_type=jnp.float32)

  _visit(j < cnt_ref[i], msk_ref, entry, segmented, step)

  @pl.when(j == width - 1)
  def _finish():
    dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(idx_ref, cnt_ref, msk_ref, *refs, scale, causal, window, width, groups,
                segmented):
  if segmented:
    qseg_ref, kseg_ref, *refs = refs
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
  kb, t = pl.program_id(2), pl.program_id(3)
  # lax.rem / lax.div, not % and //: grid indices are non-negative, and jnp's floor division adds
  # sign fix-ups whose Mosaic lowering is chip-specific.
  entry = kb * width + lax.rem(t, width)
  block_q, block_k = q_ref.shape[0], k_ref.shape[0]

  @pl.when(t == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  # Transposed tile [block_k, block_q]: queries run along lanes, so lse and delta are row vectors.
  def step(masked: bool):
    q, do = q_ref[...], do_ref[...]
    s_t = lax.dot_general(k_ref[...], q, _NT, preferred_element_type=jnp.float32) * scale
    p_t = jnp.exp(s_t - lse_ref[...])
    if masked:
      k_pos = kb * block_k + lax.broadcasted_iota(jnp.int32, s_t.shape, 0)
      q_pos = idx_ref[entry] * block_q + lax.broadcasted_iota(jnp.int32, s_t.shape, 1)
      mask = _token_mask(q_pos, k_pos, qseg_ref[...] if segmented else None,
                         _column(kseg_ref) if segmented else None, causal=causal, window=window)
      p_t = jnp.where(mask, p_t, 0.0)
    dv_sc[...] += lax.dot_general(p_t.astype(do.dtype), do, _NN,
                                  preferred_element_type=jnp.float32)
    dp_t = lax.dot_general(v_ref[...], do, _NT, preferred_element_type=jnp.float32)
    ds_t = p_t * (dp_t - delta_ref[...])
    dk_sc[...] += lax.dot_general(ds_t.astype(q.dtype), q, _NN, preferred_element_type=jnp.float32)

  _visit(lax.rem(t, width) < cnt_ref[kb], msk_ref, entry, segmented, step)

  @pl.when(t == groups * width - 1)
  def _finish():
    dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- wrappers


def _prepare(q, k, blocks, *, causal, window, block_q, block_k, scale):
  """Validates the static arguments; returns (blocks, needs_mask, scale)."""
  _, seq_len, num_q_heads, head_dim = q.shape
  for name, block in (('block_q', block_q), ('block_k', block_k)):
    if block % LANES or seq_len % block:
      raise ValueError(f"mosaic attention needs {name} to be a multiple of {LANES} dividing "
                       f"S={seq_len}, got {block}; pick another block size or backend='reference'")
  if num_q_heads % k.shape[2]:
    raise ValueError(f'query heads ({num_q_heads}) must be a multiple of key/value heads '
                     f'({k.shape[2]})')
  if blocks is None:
    blocks = computed_blocks(seq_len, block_q, block_k, causal=causal, window=window)
  blocks = np.asarray(blocks, dtype=bool)
  grid_shape = (seq_len // block_q, seq_len // block_k)
  if blocks.shape != grid_shape:
    raise ValueError(f'blocks must have shape {grid_shape} (S/block_q, S/block_k), got '
                     f'{blocks.shape}')
  needs_mask = tile_needs_mask(seq_len, block_q, block_k, causal=causal, window=window)
  return blocks, needs_mask, head_dim ** -0.5 if scale is None else float(scale)


def _tables(blocks, needs_mask):
  """Flat int32 scalar-prefetch tables (1-D avoids SMEM's 2-D padding) and the row width."""
  indices, counts, masked = row_schedule(blocks, needs_mask)
  width = indices.shape[1]
  return (jnp.asarray(indices.reshape(-1)), jnp.asarray(counts),
          jnp.asarray(masked.reshape(-1))), width


def _heads_major(x_bshd):
  return jnp.swapaxes(x_bshd, 1, 2)


def _interpret(interpret: bool):
  return pltpu.InterpretParams() if interpret else False


def _compiler_params():
  # The last axis carries the accumulators from step to step; the others are independent.
  return pltpu.CompilerParams(
      dimension_semantics=('parallel', 'parallel', 'parallel', 'arbitrary'))


def _query_major_specs(width: int, groups: int, block_q: int, block_k: int, head_dim: int):
  """BlockSpecs on grid (b, q head, q block i, entry j) for the forward and dQ kernels."""
  def key_block(i, j, idx):
    return idx[i * width + j]

  return dict(
      q=pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i, j, *_: (b, h, i, 0)),
      kv=pl.BlockSpec((None, None, block_k, head_dim),
                      lambda b, h, i, j, idx, *_: (b, lax.div(h, groups), key_block(i, j, idx), 0)),
      q_row=pl.BlockSpec((None, None, 1, block_q), lambda b, h, i, j, *_: (b, h, 0, i)),
      q_seg=pl.BlockSpec((None, 1, block_q), lambda b, h, i, j, *_: (b, 0, i)),
      k_seg=pl.BlockSpec((None, 1, block_k),
                         lambda b, h, i, j, idx, *_: (b, 0, key_block(i, j, idx))))


def fwd(q, k, v, segment_ids=None, *, causal: bool = True, window: int | None = None,
        blocks: np.ndarray | None = None, scale: float | None = None, block_q: int = 128,
        block_k: int = 128, interpret: bool = False):
  """(out [B, S, Hq, D] in q.dtype, lse float32 [B, Hq, S]) over the tiles marked in `blocks`."""
  blocks, needs_mask, scale = _prepare(q, k, blocks, causal=causal, window=window,
                                       block_q=block_q, block_k=block_k, scale=scale)
  batch, seq_len, num_q_heads, head_dim = q.shape
  tables, width = _tables(blocks, needs_mask)
  specs = _query_major_specs(width, num_q_heads // k.shape[2], block_q, block_k, head_dim)
  segmented = segment_ids is not None
  in_specs, inputs = [], []
  if segmented:
    seg_b1s = jnp.asarray(segment_ids, jnp.int32)[:, None, :]
    in_specs += [specs['q_seg'], specs['k_seg']]
    inputs += [seg_b1s, seg_b1s]
  in_specs += [specs['q'], specs['kv'], specs['kv']]
  inputs += [_heads_major(q), _heads_major(k), _heads_major(v)]

  kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, window=window, width=width,
                             segmented=segmented)
  out_bhsd, lse_bh1s = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(batch, num_q_heads, seq_len // block_q, width),
          in_specs=in_specs,
          out_specs=[specs['q'], specs['q_row']],
          scratch_shapes=[pltpu.VMEM((block_q, LANES), jnp.float32),  # running max m
                          pltpu.VMEM((block_q, LANES), jnp.float32),  # running sum l
                          pltpu.VMEM((block_q, head_dim), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((batch, num_q_heads, seq_len, head_dim), q.dtype),
                 jax.ShapeDtypeStruct((batch, num_q_heads, 1, seq_len), jnp.float32)],
      compiler_params=_compiler_params(),
      interpret=_interpret(interpret),
      name='flash_attention_fwd',
  )(*tables, *inputs)
  return _heads_major(out_bhsd), lse_bh1s[:, :, 0]


def bwd(q, k, v, segment_ids, out, lse, d_out, *, causal: bool = True, window: int | None = None,
        blocks: np.ndarray | None = None, scale: float | None = None, block_q: int = 128,
        block_k: int = 128, interpret: bool = False):
  """(dq, dk, dv) in the input dtypes, from the forward's out and lse float32 [B, Hq, S]."""
  blocks, needs_mask, scale = _prepare(q, k, blocks, causal=causal, window=window,
                                       block_q=block_q, block_k=block_k, scale=scale)
  batch, seq_len, num_q_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  groups = num_q_heads // num_kv_heads
  segmented = segment_ids is not None
  delta_bhs = jnp.swapaxes(
      jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1), 1, 2)
  lse_bh1s = lse.astype(jnp.float32)[:, :, None, :]
  delta_bh1s = delta_bhs[:, :, None, :]
  q_bhsd, k_bhsd, v_bhsd, do_bhsd = map(_heads_major, (q, k, v, d_out))
  seg_b1s = jnp.asarray(segment_ids, jnp.int32)[:, None, :] if segmented else None
  static = dict(scale=scale, causal=causal, window=window, segmented=segmented)

  # dQ: rows are query blocks, the forward's schedule.
  tables, width = _tables(blocks, needs_mask)
  specs = _query_major_specs(width, groups, block_q, block_k, head_dim)
  in_specs = [specs['q_seg'], specs['k_seg']] if segmented else []
  inputs = [seg_b1s, seg_b1s] if segmented else []
  in_specs += [specs['q'], specs['kv'], specs['kv'], specs['q'], specs['q_row'], specs['q_row']]
  inputs += [q_bhsd, k_bhsd, v_bhsd, do_bhsd, lse_bh1s, delta_bh1s]
  dq_bhsd = pl.pallas_call(
      functools.partial(_dq_kernel, width=width, **static),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(batch, num_q_heads, seq_len // block_q, width),
          in_specs=in_specs, out_specs=specs['q'],
          scratch_shapes=[pltpu.VMEM((block_q, head_dim), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q_bhsd.shape, q.dtype),
      compiler_params=_compiler_params(), interpret=_interpret(interpret),
      name='flash_attention_dq',
  )(*tables, *inputs)

  # dK, dV: rows are key blocks (the transposed schedule); step t of key block kb visits query
  # head kv_head * groups + t // width_t and the (t % width_t)-th q block of kb's list.
  tables_t, width_t = _tables(blocks.T, needs_mask.T)

  def q_head(h, t):
    return h * groups + lax.div(t, width_t)

  def q_block(kb, t, idx):
    return idx[kb * width_t + lax.rem(t, width_t)]

  q_spec = pl.BlockSpec((None, None, block_q, head_dim),
                        lambda b, h, kb, t, idx, *_: (b, q_head(h, t), q_block(kb, t, idx), 0))
  q_row_spec = pl.BlockSpec((None, None, 1, block_q),
                            lambda b, h, kb, t, idx, *_: (b, q_head(h, t), 0, q_block(kb, t, idx)))
  kv_spec = pl.BlockSpec((None, None, block_k, head_dim), lambda b, h, kb, t, *_: (b, h, kb, 0))
  in_specs, inputs = [], []
  if segmented:
    in_specs += [pl.BlockSpec((None, 1, block_q),
                              lambda b, h, kb, t, idx, *_: (b, 0, q_block(kb, t, idx))),
                 pl.BlockSpec((None, 1, block_k), lambda b, h, kb, t, *_: (b, 0, kb))]
    inputs += [seg_b1s, seg_b1s]
  in_specs += [q_spec, kv_spec, kv_spec, q_spec, q_row_spec, q_row_spec]
  inputs += [q_bhsd, k_bhsd, v_bhsd, do_bhsd, lse_bh1s, delta_bh1s]
  dk_bhsd, dv_bhsd = pl.pallas_call(
      functools.partial(_dkv_kernel, width=width_t, groups=groups, **static),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(batch, num_kv_heads, seq_len // block_k, groups * width_t),
          in_specs=in_specs, out_specs=[kv_spec, kv_spec],
          scratch_shapes=[pltpu.VMEM((block_k, head_dim), jnp.float32),
                          pltpu.VMEM((block_k, head_dim), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k_bhsd.shape, k.dtype),
                 jax.ShapeDtypeStruct(v_bhsd.shape, v.dtype)],
      compiler_params=_compiler_params(), interpret=_interpret(interpret),
      name='flash_attention_dkv',
  )(*tables_t, *inputs)
  return _heads_major(dq_bhsd), _heads_major(dk_bhsd), _heads_major(dv_bhsd)
