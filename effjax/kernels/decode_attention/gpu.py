"""Decode attention as a Pallas kernel for the Triton lowering: split over the cache, then merged.

One program per (sequence b, key/value head h, cache range s). It holds the R query rows that
read head h: the n new tokens times the Hq / Hkv query heads of the group, row r = token i x
group + g, loaded masked as a power of two >= 16 rows (Triton's smallest dot; the rows past
n x group read as zeros, so the caller passes q unpadded). It walks the key blocks
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


def _check_rows(rows: int, n: int, group: int) -> None:
  if rows != n * group:
    raise ValueError(f'decode attention kernel: q holds {rows} rows a key/value head, expected '
                     f'n x group = {n} x {group} (unpadded: the kernel pads them itself)')


def _dot(a, b, trans_b: bool = False):
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _load(ref, idx, mask):
  return ref[idx] if mask is None else plgpu.load(ref.at[idx], mask=mask, other=0.)


def _kernel(start_ref, slot_ref, q_ref, k_ref, v_ref, *refs, n, group, rows, rp, block_k,
            per_split, length, scale, writes, rotary, final):
  # writes: the n new tokens' keys and values come as refs of their own ([B, n, Hkv, D], after
  # the cache in `refs`) and the cache as outputs aliasing it (after o, m, l). The cache part of
  # the loop then masks every slot from `slot` on, and range 0's program adds the new tokens
  # from registers and writes them to the cache. A block that holds slot - 1 may also load
  # slots being written meanwhile (blocks are loaded whole), but those columns are masked: the
  # value loaded there, old or new, only ever meets a probability of 0 (both are finite).
  # rotary (writes only): q and the new keys arrive before the rotary embedding, with its
  # cos / sin tables [B, n, D/2] (after the new values); the kernel rotates them (rotate-half
  # form, in float32 as effjax.models.rope does) and works on the two halves of the head dim as
  # two dots, so no concatenation is needed; the cache receives rotated keys.
  # final (one range, split == 1): the program sees every slot, so it writes the attention
  # itself (acc / l in the output's dtype, [B, Hkv, rows, D]) and no row max / sum: the step
  # needs no merge kernel after it.
  refs = list(refs)
  kn_ref = vn_ref = cos_ref = sin_ref = kc_ref = vc_ref = None
  if writes:
    kn_ref, vn_ref = refs.pop(0), refs.pop(0)
    if rotary:
      cos_ref, sin_ref = refs.pop(0), refs.pop(0)
  outs = 1 if final else 3
  o_ref, m_ref, l_ref = (refs[:3] if not final else (refs[0], None, None))
  if writes:
    kc_ref, vc_ref = refs[outs:]
  b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start = start_ref[b]
  slot = slot_ref[0]
  first = jnp.maximum(start, s * (per_split * block_k)) // block_k
  seen = slot if writes else slot + n  # cache slots read: below `seen`
  end = jnp.minimum(seen, jnp.minimum((s + 1) * (per_split * block_k), length))
  last = (end + block_k - 1) // block_k  # exclusive; <= first when the range has nothing to see
  r = lax.broadcasted_iota(jnp.int32, (rp,), 0)
  d = q_ref.shape[-1]
  half = d // 2
  # the query rows: those past n x group (up to the dot's rp) read as zeros
  row_mask = None if rows == rp else (r < rows)[:, None]
  if rotary:
    c, sn = _row_tables(cos_ref, sin_ref, b, r // group, n)
    qa = _load(q_ref, (b, h, pl.ds(0, rp), pl.ds(0, half)), row_mask).astype(jnp.float32)
    qb = _load(q_ref, (b, h, pl.ds(0, rp), pl.ds(half, half)), row_mask).astype(jnp.float32)
    parts = [(qa * c - qb * sn).astype(q_ref.dtype), (qb * c + qa * sn).astype(q_ref.dtype)]
    cols = [pl.ds(0, half), pl.ds(half, half)]
  else:
    parts = [_load(q_ref, (b, h, pl.ds(0, rp), slice(None)), row_mask)]
    cols = [slice(None)]
  limit = slot + jnp.minimum(r // group, n - 1)  # the last slot row r may see
  if writes:
    limit = jnp.minimum(limit, slot - 1)
  tail = length % block_k != 0

  def step(i, carry):
    m, l, acc = carry
    k0 = pl.multiple_of(i * block_k, block_k)
    keys = k0 + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    inside = (keys < length)[:, None] if tail else None
    sc = None
    for qp, col in zip(parts, cols):
      k = _load(k_ref, (b, pl.ds(k0, block_k), h, col), inside)
      term = _dot(qp.astype(k.dtype), k, trans_b=True)
      sc = term if sc is None else sc + term
    v = _load(v_ref, (b, pl.ds(k0, block_k), h, slice(None)), inside)
    sc = sc * scale  # [rp, block_k]
    ok = (keys[None, :] >= start) & (keys[None, :] <= limit[:, None])
    sc = jnp.where(ok, sc, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(sc, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(sc - m_new[:, None])
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return m_new, l, acc

  init = (jnp.full((rp,), _NEG, jnp.float32), jnp.zeros((rp,), jnp.float32),
          jnp.zeros((rp, d), jnp.float32))
  m, l, acc = lax.fori_loop(first, jnp.maximum(first, last), step, init)
  if writes:
    m, l, acc = _new_tokens(parts, kn_ref, vn_ref, kc_ref, vc_ref, (m, l, acc), b=b, h=h, s=s,
                            start=start, slot=slot, n=n, group=group, r=r, length=length,
                            scale=scale, tables=(cos_ref, sin_ref) if rotary else None)
  if final:
    out = (acc / l[:, None]).astype(o_ref.dtype)
    if rows == rp:
      o_ref[b, h] = out
    else:  # o has `rows` rows: the padding rows are not stored
      plgpu.store(o_ref.at[b, h, pl.ds(0, rp)], out, mask=(r < rows)[:, None])
  elif rows == rp:
    o_ref[b, h, s] = acc
    m_ref[b, h, s] = m
    l_ref[b, h, s] = l
  else:
    real = r < rows
    plgpu.store(o_ref.at[b, h, s], acc, mask=real[:, None])
    plgpu.store(m_ref.at[b, h, s], m, mask=real)
    plgpu.store(l_ref.at[b, h, s], l, mask=real)


def _row_tables(cos_ref, sin_ref, b, token_r, n):
  """The rotary cos / sin rows [rp, D/2] of each query row's token (token_r = r // group)."""
  c = cos_ref[b, 0, :][None, :]
  sn = sin_ref[b, 0, :][None, :]
  for j in range(1, n):
    here = (token_r == j)[:, None]
    c = jnp.where(here, cos_ref[b, j, :][None, :], c)
    sn = jnp.where(here, sin_ref[b, j, :][None, :], sn)
  return c, sn


def _new_tokens(parts, kn_ref, vn_ref, kc_ref, vc_ref, carry, *, b, h, s, start, slot, n, group,
                r, length, scale, tables):
  """Range 0's share of the n new tokens: their scores and values folded into the online
  softmax (as one more block of n keys), then their keys and values written to the cache.

  parts: the query rows as the cache loop used them (whole, or the two rotated halves of the
  head dim); tables: the rotary (cos, sin) refs when the new keys are still to be rotated.
  Row r (token r // group) sees new token j when j <= r // group and slot + j >= start, as it
  would see the written slot. Products are elementwise in float32 from the cache's dtype (n is
  a handful, below Triton's smallest dot), the probabilities rounded to that dtype before the
  value product as in the cache blocks."""
  m, l, acc = carry
  dtype = kc_ref.dtype
  mine = s == 0
  d = kn_ref.shape[-1]
  half = d // 2
  if tables is None:
    keys = [[kn_ref[b, j, h, :].astype(dtype)] for j in range(n)]  # [D] each
  else:
    cos_ref, sin_ref = tables
    keys = []
    for j in range(n):
      ka = kn_ref[b, j, h, pl.ds(0, half)].astype(jnp.float32)
      kb = kn_ref[b, j, h, pl.ds(half, half)].astype(jnp.float32)
      c, sn = cos_ref[b, j, :], sin_ref[b, j, :]
      keys.append([(ka * c - kb * sn).astype(kn_ref.dtype).astype(dtype),
                   (kb * c + ka * sn).astype(kn_ref.dtype).astype(dtype)])
  values = [vn_ref[b, j, h, :].astype(dtype) for j in range(n)]
  qf = [qp.astype(dtype).astype(jnp.float32) for qp in parts]
  scores = []
  for j in range(n):
    sc = None
    for qp, kp in zip(qf, keys[j]):
      term = jnp.sum(qp * kp.astype(jnp.float32)[None, :], axis=1)
      sc = term if sc is None else sc + term
    sc = sc * scale  # [rp]
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
        if tables is None:
          kc_ref[b, slot + j, h, :] = keys[j][0]
        else:
          kc_ref[b, slot + j, h, pl.ds(0, half)] = keys[j][0]
          kc_ref[b, slot + j, h, pl.ds(half, half)] = keys[j][1]
        vc_ref[b, slot + j, h, :] = values[j]

  return m_new, l, acc


def _whole(shape):
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def partials(q_bkrd, k_blkd, v_blkd, start_b, slot_1, *, n: int, group: int, block_k: int,
             split: int, num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
  """q [B, Hkv, n x group, D] (rows r = token x group + g) against the cache -> (out [B, Hkv,
  split, Rp, D], row max [B, Hkv, split, Rp], row sum [..]) in float32, Rp = padded_rows(n x
  group), rows past n x group unwritten; for split == 1, (the attention [B, Hkv, n x group, D]
  in q's dtype, None, None): nothing to merge."""
  b, kv, rows, d = q_bkrd.shape
  length = k_blkd.shape[1]
  _check_rows(rows, n, group)
  check_tiling(rows, d, length, block_k=block_k, split=split)
  rp = padded_rows(rows)
  blocks = -(-length // block_k)
  per_split = -(-blocks // split)
  kernel = functools.partial(_kernel, n=n, group=group, rows=rows, rp=rp, block_k=block_k,
                             per_split=per_split, length=length, scale=d ** -0.5, writes=False,
                             rotary=False, final=split == 1)
  operands = (start_b, slot_1, q_bkrd, k_blkd, v_blkd)
  specs, shapes = _results(q_bkrd, split, rp, operands)
  got = pl.pallas_call(
      kernel, grid=(b, kv, split),
      in_specs=[_whole(x.shape) for x in operands],
      out_specs=specs, out_shape=shapes,
      compiler_params=_CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name='decode_attention',
  )(*operands)
  return tuple(got) if split > 1 else (got[0], None, None)


def _results(q_bkrd, split: int, rp: int, operands):
  """The attention outputs' block specs and shapes: the partials (out, row max, row sum) in
  float32, or for one range the attention itself in q's dtype ([B, Hkv, rows, D])."""
  b, kv, rows, d = q_bkrd.shape
  if split == 1:
    return ([_whole((b, kv, rows, d))], [out_struct((b, kv, rows, d), q_bkrd.dtype, *operands)])
  shapes = ((b, kv, split, rp, d), (b, kv, split, rp), (b, kv, split, rp))
  return ([_whole(x) for x in shapes],
          [out_struct(x, jnp.float32, *operands) for x in shapes])


def partials_writing(q_bkrd, k_new, v_new, k_blkd, v_blkd, start_b, slot_1, *, n: int,
                     group: int, block_k: int, split: int, rotary=None, num_warps: int = 4,
                     num_stages: int = 2, interpret: bool = False):
  """`partials` for a cache that does not yet hold the new tokens: k_new, v_new [B, n, Hkv, D]
  are attended from registers and written to the cache at slots slot .. slot + n - 1 (those at
  or past L dropped) by the kernel itself. -> (out, row max, row sum, k cache, v cache): the
  caches are the inputs' buffers updated in place (input_output_aliases), so the step has no
  separate cache-write kernels. For split == 1 the first three are (the attention, None, None),
  as `partials` gives them.

  rotary: None, or (cos, sin) [B, n, D/2] float32: q and k_new are then before the rotary
  embedding, and the kernel rotates both (the step has no separate rotary kernels either);
  needs D >= 2 x MIN_TILE (each half is one dot's contraction)."""
  b, kv, rows, d = q_bkrd.shape
  length = k_blkd.shape[1]
  _check_rows(rows, n, group)
  check_tiling(rows, d, length, block_k=block_k, split=split)
  rp = padded_rows(rows)
  if k_new.shape != (b, n, kv, d) or v_new.shape != k_new.shape:
    raise ValueError(f'decode attention kernel: new keys/values must be [B, n, Hkv, D] = '
                     f'{(b, n, kv, d)}, got {k_new.shape} and {v_new.shape}')
  tables = ()
  if rotary is not None:
    if d < 2 * MIN_TILE:
      raise ValueError(f'decode attention kernel: the rotary embedding in the kernel needs head '
                       f'dim >= {2 * MIN_TILE}, got {d}')
    tables = tuple(jnp.asarray(t, jnp.float32) for t in rotary)
    if any(t.shape != (b, n, d // 2) for t in tables):
      raise ValueError(f'decode attention kernel: rotary cos / sin must be [B, n, D/2] = '
                       f'{(b, n, d // 2)}, got {[t.shape for t in tables]}')
  blocks = -(-length // block_k)
  per_split = -(-blocks // split)
  kernel = functools.partial(_kernel, n=n, group=group, rows=rows, rp=rp, block_k=block_k,
                             per_split=per_split, length=length, scale=d ** -0.5, writes=True,
                             rotary=bool(tables), final=split == 1)
  operands = (start_b, slot_1, q_bkrd, k_blkd, v_blkd, k_new, v_new) + tables
  cache = k_blkd.shape
  specs, shapes = _results(q_bkrd, split, rp, operands)
  outs = len(shapes)
  got = pl.pallas_call(
      kernel, grid=(b, kv, split),
      in_specs=[_whole(x.shape) for x in operands],
      out_specs=specs + [_whole(cache), _whole(cache)],
      out_shape=shapes + [out_struct(cache, k_blkd.dtype, *operands),
                          out_struct(cache, v_blkd.dtype, *operands)],
      input_output_aliases={3: outs, 4: outs + 1},
      compiler_params=_CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name='decode_attention_write',
  )(*operands)
  return tuple(got) if split > 1 else (got[0], None, None, *got[1:])


def merge(out, m, l, rows: int) -> jax.Array:
  """The split ranges' partial results -> [B, Hkv, rows, D] float32 (rows past `rows` dropped
  first: they were never written)."""
  out, m, l = out[:, :, :, :rows], m[:, :, :, :rows], l[:, :, :, :rows]
  top = jnp.max(m, axis=2, keepdims=True)
  w = jnp.exp(m - top)
  return jnp.sum(w[..., None] * out, axis=2) / jnp.sum(w * l, axis=2)[..., None]
