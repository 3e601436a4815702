"""Decode attention as a Pallas kernel for the Triton lowering: split over the cache, then merged.

One program per (sequence b, key/value head h, cache range s). It holds the R query rows that
read head h: the n new tokens times the Hq / Hkv query heads of the group, row r = token i x
group + g, zero-padded to a power of two >= 16 (Triton's smallest dot). It walks the key blocks
of its range that some row may see (from max(start_b, range start) to min(slot + n, range end),
bounds computed in the kernel from scalar loads, so a step early in a generation reads only the
filled part of the cache and the program is compiled once for every slot), with the online
softmax of flash attention, and writes its unnormalised output, row maximum and row sum in
float32 for the rows that exist. `merge` (plain JAX, one small fusion) combines the ranges.

Splitting the cache is what makes a batch-1 step fast: B x Hkv programs alone (16 for a 1B
model) leave most of an H100 / H200's 132 SMs idle while the cache is read, so the cache is cut
into `split` ranges of whole blocks (flash-decoding).

Tile rules (checked by `check_tiling`): block_k and D powers of two >= 16, R <= MAX_ROWS. The
cache length needs no particular multiple: the last block's loads are masked past L.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from effjax.kernels._compat import out_struct

_CompilerParams = getattr(plgpu, 'CompilerParams', None) or plgpu.TritonCompilerParams
MIN_TILE = 16
MAX_ROWS = 128  # query rows (tokens x group) a program holds
_NEG = -1e30  # the running maximum's start: finite, so a fully masked block leaves it unchanged


def _power_of_two(v: int) -> bool:
  return v >= 1 and not v & (v - 1)


def padded_rows(rows: int) -> int:
  return max(MIN_TILE, 1 << (max(rows, 1) - 1).bit_length())


def check_tiling(rows: int, head_dim: int, length: int, *, block_k: int, split: int) -> None:
  """Raises ValueError naming the first constraint the shapes or the tiling break."""
  if not _power_of_two(head_dim) or head_dim < MIN_TILE:
    raise ValueError(f'decode attention kernel: head dim {head_dim} must be a power of two >= '
                     f'{MIN_TILE}')
  if not _power_of_two(block_k) or block_k < MIN_TILE:
    raise ValueError(f'decode attention kernel: block_k={block_k} must be a power of two >= '
                     f'{MIN_TILE}')
  if padded_rows(rows) > MAX_ROWS:
    raise ValueError(f'decode attention kernel: {rows} query rows (new tokens x query heads per '
                     f'key/value head) exceed {MAX_ROWS}')
  blocks = -(-length // block_k)
  if not 1 <= split <= blocks:
    raise ValueError(f'decode attention kernel: split={split} must be in [1, {blocks}] (the '
                     f'cache of {length} slots has {blocks} blocks of {block_k})')


def _dot(a, b, trans_b: bool = False):
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _kernel(start_ref, slot_ref, q_ref, k_ref, v_ref, *refs, n, group, rows, rp, block_k,
            per_split, length, scale, writes):
  # writes: the n new tokens' keys and values come as refs of their own ([B, n, Hkv, D], after
  # the cache in `refs`) and the cache as outputs aliasing it (after o, m, l). The cache part of
  # the loop then masks every slot from `slot` on, and range 0's program adds the new tokens
  # from registers and writes them to the cache. A block that holds slot - 1 may also load
  # slots being written meanwhile (blocks are loaded whole), but those columns are masked: the
  # value loaded there, old or new, only ever meets a probability of 0 (both are finite).
  if writes:
    kn_ref, vn_ref, o_ref, m_ref, l_ref, kc_ref, vc_ref = refs
  else:
    o_ref, m_ref, l_ref = refs
  b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start = start_ref[b]
  slot = slot_ref[0]
  first = jnp.maximum(start, s * (per_split * block_k)) // block_k
  seen = slot if writes else slot + n  # cache slots read: below `seen`
  end = jnp.minimum(seen, jnp.minimum((s + 1) * (per_split * block_k), length))
  last = (end + block_k - 1) // block_k  # exclusive; <= first when the range has nothing to see
  q = q_ref[b, h]  # [rp, D]
  r = lax.broadcasted_iota(jnp.int32, (rp,), 0)
  limit = slot + jnp.minimum(r // group, n - 1)  # the last slot row r may see
  if writes:
    limit = jnp.minimum(limit, slot - 1)
  tail = length % block_k != 0

  def step(i, carry):
    m, l, acc = carry
    k0 = pl.multiple_of(i * block_k, block_k)
    keys = k0 + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    if tail:
      inside = (keys < length)[:, None]
      k = plgpu.load(k_ref.at[b, pl.ds(k0, block_k), h, :], mask=inside, other=0.)
      v = plgpu.load(v_ref.at[b, pl.ds(k0, block_k), h, :], mask=inside, other=0.)
    else:
      k = k_ref[b, pl.ds(k0, block_k), h, :]
      v = v_ref[b, pl.ds(k0, block_k), h, :]
    sc = _dot(q.astype(k.dtype), k, trans_b=True) * scale  # [rp, block_k]
    ok = (keys[None, :] >= start) & (keys[None, :] <= limit[:, None])
    sc = jnp.where(ok, sc, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(sc, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(sc - m_new[:, None])
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return m_new, l, acc

  d = q.shape[-1]
  init = (jnp.full((rp,), _NEG, jnp.float32), jnp.zeros((rp,), jnp.float32),
          jnp.zeros((rp, d), jnp.float32))
  m, l, acc = lax.fori_loop(first, jnp.maximum(first, last), step, init)
  if writes:
    m, l, acc = _new_tokens(q, kn_ref, vn_ref, kc_ref, vc_ref, (m, l, acc), b=b, h=h, s=s,
                            start=start, slot=slot, n=n, group=group, r=r, length=length,
                            scale=scale)
  if rows == rp:
    o_ref[b, h, s] = acc
    m_ref[b, h, s] = m
    l_ref[b, h, s] = l
  else:
    real = r < rows
    plgpu.store(o_ref.at[b, h, s], acc, mask=real[:, None])
    plgpu.store(m_ref.at[b, h, s], m, mask=real)
    plgpu.store(l_ref.at[b, h, s], l, mask=real)


def _new_tokens(q, kn_ref, vn_ref, kc_ref, vc_ref, carry, *, b, h, s, start, slot, n, group, r,
                length, scale):
  """Range 0's share of the n new tokens: their scores and values folded into the online
  softmax (as one more block of n keys), then their keys and values written to the cache.

  Row r (token r // group) sees new token j when j <= r // group and slot + j >= start, as it
  would see the written slot. Products are elementwise in float32 from the cache's dtype (n is
  a handful, below Triton's smallest dot), the probabilities rounded to that dtype before the
  value product as in the cache blocks."""
  m, l, acc = carry
  dtype = kc_ref.dtype
  mine = s == 0
  keys = [kn_ref[b, j, h, :].astype(dtype) for j in range(n)]  # [D] each
  values = [vn_ref[b, j, h, :].astype(dtype) for j in range(n)]
  qf = q.astype(dtype).astype(jnp.float32)
  scores = []
  for j in range(n):
    sc = jnp.sum(qf * keys[j].astype(jnp.float32)[None, :], axis=1) * scale  # [rp]
    ok = mine & (r // group >= j) & (slot + j >= start)
    scores.append(jnp.where(ok, sc, -jnp.inf))
  m_new = m
  for sc in scores:
    m_new = jnp.maximum(m_new, sc)
  alpha = jnp.exp(m - m_new)
  l = l * alpha
  acc = acc * alpha[:, None]
  for sc, value in zip(scores, values):
    p = jnp.exp(sc - m_new)
    l = l + p
    acc = acc + (p.astype(dtype).astype(jnp.float32)[:, None] *
                 value.astype(jnp.float32)[None, :])

  @pl.when(mine)
  def _():
    for j in range(n):
      @pl.when(slot + j < length)
      def _(j=j):
        kc_ref[b, slot + j, h, :] = keys[j]
        vc_ref[b, slot + j, h, :] = values[j]

  return m_new, l, acc


def _whole(shape):
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def partials(q_bkrd, k_blkd, v_blkd, start_b, slot_1, *, n: int, group: int, block_k: int,
             split: int, num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
  """q [B, Hkv, R, D] (rows r = token x group + g, zero past n x group) against the cache ->
  (out [B, Hkv, split, R, D], row max [B, Hkv, split, R], row sum [..]) in float32, rows past
  n x group unwritten."""
  b, kv, rp, d = q_bkrd.shape
  length = k_blkd.shape[1]
  rows = n * group
  check_tiling(rows, d, length, block_k=block_k, split=split)
  blocks = -(-length // block_k)
  per_split = -(-blocks // split)
  kernel = functools.partial(_kernel, n=n, group=group, rows=rows, rp=rp, block_k=block_k,
                             per_split=per_split, length=length, scale=d ** -0.5, writes=False)
  operands = (start_b, slot_1, q_bkrd, k_blkd, v_blkd)
  return pl.pallas_call(
      kernel, grid=(b, kv, split),
      in_specs=[_whole(x.shape) for x in operands],
      out_specs=[_whole((b, kv, split, rp, d)), _whole((b, kv, split, rp)),
                 _whole((b, kv, split, rp))],
      out_shape=[out_struct((b, kv, split, rp, d), jnp.float32, *operands),
                 out_struct((b, kv, split, rp), jnp.float32, *operands),
                 out_struct((b, kv, split, rp), jnp.float32, *operands)],
      compiler_params=_CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name='decode_attention',
  )(*operands)


def partials_writing(q_bkrd, k_new, v_new, k_blkd, v_blkd, start_b, slot_1, *, n: int,
                     group: int, block_k: int, split: int, num_warps: int = 4,
                     num_stages: int = 2, interpret: bool = False):
  """`partials` for a cache that does not yet hold the new tokens: k_new, v_new [B, n, Hkv, D]
  are attended from registers and written to the cache at slots slot .. slot + n - 1 (those at
  or past L dropped) by the kernel itself. -> (out, row max, row sum, k cache, v cache): the
  caches are the inputs' buffers updated in place (input_output_aliases), so the step has no
  separate cache-write kernels."""
  b, kv, rp, d = q_bkrd.shape
  length = k_blkd.shape[1]
  rows = n * group
  check_tiling(rows, d, length, block_k=block_k, split=split)
  if k_new.shape != (b, n, kv, d) or v_new.shape != k_new.shape:
    raise ValueError(f'decode attention kernel: new keys/values must be [B, n, Hkv, D] = '
                     f'{(b, n, kv, d)}, got {k_new.shape} and {v_new.shape}')
  blocks = -(-length // block_k)
  per_split = -(-blocks // split)
  kernel = functools.partial(_kernel, n=n, group=group, rows=rows, rp=rp, block_k=block_k,
                             per_split=per_split, length=length, scale=d ** -0.5, writes=True)
  operands = (start_b, slot_1, q_bkrd, k_blkd, v_blkd, k_new, v_new)
  cache = k_blkd.shape
  return pl.pallas_call(
      kernel, grid=(b, kv, split),
      in_specs=[_whole(x.shape) for x in operands],
      out_specs=[_whole((b, kv, split, rp, d)), _whole((b, kv, split, rp)),
                 _whole((b, kv, split, rp)), _whole(cache), _whole(cache)],
      out_shape=[out_struct((b, kv, split, rp, d), jnp.float32, *operands),
                 out_struct((b, kv, split, rp), jnp.float32, *operands),
                 out_struct((b, kv, split, rp), jnp.float32, *operands),
                 out_struct(cache, k_blkd.dtype, *operands),
                 out_struct(cache, v_blkd.dtype, *operands)],
      input_output_aliases={3: 3, 4: 4},
      compiler_params=_CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name='decode_attention_write',
  )(*operands)


def merge(out, m, l, rows: int) -> jax.Array:
  """The split ranges' partial results -> [B, Hkv, rows, D] float32 (rows past `rows` dropped
  first: they were never written)."""
  out, m, l = out[:, :, :, :rows], m[:, :, :, :rows], l[:, :, :, :rows]
  top = jnp.max(m, axis=2, keepdims=True)
  w = jnp.exp(m - top)
  return jnp.sum(w[..., None] * out, axis=2) / jnp.sum(w * l, axis=2)[..., None]
