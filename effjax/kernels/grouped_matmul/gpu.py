"""Grouped matmul as Pallas kernels for the Triton lowering (GPU).

gmm (lhs [M, K] x rhs [G, K, N] -> [M, N]). One program per (visit, N tile), visits from
schedule.gmm_visits. A program reads its visit's m-tile, group and owned rows [lo, hi) with scalar
loads from the int32 tables, runs a lax.fori_loop over the K tiles accumulating
lhs[tile rows, k] @ rhs[group, k, n] in float32, and stores only the rows it owns with a masked
(predicated) store: rows outside [lo, hi) are not written at all. Visits partition the rows, so
two programs that share an m-tile write disjoint rows and need no ordering or atomics. Visits of
the tail segment (rows past the groups) run zero K steps and store zeros; padded no-op visits own
no rows, run zero K steps and store nothing. With transpose_rhs the weights come as [G, N, K]
(the backward's rhs^T, read in place instead of copied).

tgmm (lhs [M, K], rhs [M, N] -> [G, K, N]). One program per (group, K tile, N tile). It loops over
its group's rows in tm-row chunks (a dynamic trip count from the group offsets; chunks are
tile-aligned, so the first and last may hold rows of neighbouring groups, which the lhs chunk's
masked load zeroes; a non-finite value in a neighbour's rhs rows would still reach the product
as 0 * inf) and accumulates lhs_chunk^T @ rhs_chunk in float32. An empty group runs no step and
writes zeros. This kernel needs no visit list: each program reads two offsets.

Program order. Both grids are one-dimensional and walked in bands, so that the programs running
at one time share their operands in L2: gmm takes BAND visits (m-tiles, one group's rows mostly)
across every N tile before the next band, so a band's lhs rows (BAND * tm * K) stay cached while
the weights stream; tgmm takes one group at a time and within it BAND K tiles across every N tile.
In plain (visit, N tile) order the ~260 programs in flight covered every m-tile for one N tile,
and each N tile re-read all of lhs from HBM (16k x 4096 bf16: 128 MB, 112 times at N=14336).

Shapes reaching this module are already padded to tile multiples (see __init__.py). Tiles are
powers of two, at least 16 (Triton's smallest dot).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from effjax.kernels._compat import out_struct
from effjax.kernels.grouped_matmul import schedule

# The Triton compiler-params class has been `CompilerParams` since JAX 0.7; older releases called
# it TritonCompilerParams.
_CompilerParams = getattr(plgpu, 'CompilerParams', None) or plgpu.TritonCompilerParams

MIN_TILE = 16


BAND = 8  # visits (gmm) or K tiles (tgmm) walked across all N tiles together; see above


def default_tiling(n: int = 0, op: str = 'gmm') -> tuple[int, int, int]:
  """(tm, tk, tn) before fitting to the shapes, from the tuning grid on one H200 (bf16, 16k rows,
  `python -m effjax.bench kernels --op=gmm --grid=tune --profile_dir=...`, experiments/moe). gmm:
  at 8 x 4096 x 14336 the forward ran 578-613 TFLOP/s with 128 x 64 x 256 (8 warps), 509 with
  128 x 64 x 128 and 393 with the earlier 64 x 64 x 128; at 64 experts (N 1408, 2048) 128 x 64 x
  128 is within 10% of the best and 256-wide N tiles pad N. So 256-wide N tiles from N = 4096,
  128 below. tgmm (the traced kernel time alone): 64-row chunks into a 128 x 128 output tile took
  7.4 ms at 8 x 4096 x 14336 and 0.52 ms at 64 x 2048 x 1408, against 9.5 and 0.76 with the
  earlier 128 x 64 x 128."""
  if op == 'tgmm':
    return 64, 128, 128
  if n >= 4096:
    return 128, 64, 256
  return 128, 64, 128


SHARED_MEMORY_BYTES = 224 * 1024  # per block on Hopper (227 KB less a margin)


def _compiler_params(itemsize: int, acc_elems: int, stage_elems: int):
  """Stages let the K loop prefetch the next tiles while the current dot runs: 4 for accumulators
  up to 128 x 128, 3 above, fewer where that many copies of one step's tiles (`stage_elems`
  elements) would not fit in shared memory (a 128 x 128 x 128 tiling asked for 256 KB at 4);
  4-byte inputs keep two. 8 warps from 128 x 256 accumulators up, which would otherwise hold 256
  float32 registers a thread."""
  stages = 4 if acc_elems <= 128 * 128 else 3
  while stages > 2 and stages * stage_elems * itemsize > SHARED_MEMORY_BYTES:
    stages -= 1
  return _CompilerParams(num_warps=8 if acc_elems >= 128 * 256 else 4,
                         num_stages=stages if itemsize <= 2 else 2)


def _banded(pid, num_rows: int, num_cols: int):
  """Program id -> (row, col) of a num_rows x num_cols grid walked in bands of BAND rows, each band
  across every column before the next (the last band may be narrower)."""
  per_band = BAND * num_cols
  band = lax.div(pid, per_band)
  first = band * BAND
  height = jnp.minimum(num_rows - first, BAND)
  within = pid - band * per_band
  return first + lax.rem(within, height), lax.div(within, height)


def _whole(shape):
  """BlockSpec handing every program the whole array; kernels slice it with pl.ds."""
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _dot(a, b, *, trans_a: bool = False):
  dims = (((0 if trans_a else 1,), (0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _check_tiles(tm: int, tk: int, tn: int, m: int, k: int, n: int) -> None:
  for name, tile, dim in (('tm', tm, m), ('tk', tk, k), ('tn', tn, n)):
    if tile < MIN_TILE or tile & (tile - 1) or dim % tile:
      raise ValueError(f"triton grouped matmul needs {name} a power of two >= {MIN_TILE} "
                       f"dividing {dim}, got {tile}; pick another tiling or "
                       f"backend='ragged_dot'")


# ----------------------------------------------------------------------------------------------
# gmm


def _gmm_kernel(tile_ref, group_ref, lo_ref, hi_ref, lhs_ref, rhs_ref, out_ref, *, tm, tk, tn,
                num_k, num_groups, num_visits, num_n, transpose_rhs):
  v, nb = _banded(pl.program_id(0), num_visits, num_n)
  group = group_ref[v]
  lo, hi = lo_ref[v], hi_ref[v]
  row0 = pl.multiple_of(tile_ref[v] * tm, tm)
  col0 = pl.multiple_of(nb * tn, tn)
  rhs_group = jnp.minimum(group, num_groups - 1)  # the tail segment (id G) reads no weights

  def step(kk, acc):
    k0 = pl.multiple_of(kk * tk, tk)
    a = lhs_ref[pl.ds(row0, tm), pl.ds(k0, tk)]
    if transpose_rhs:
      b = rhs_ref[rhs_group, pl.ds(col0, tn), pl.ds(k0, tk)]
      return acc + lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)
    b = rhs_ref[rhs_group, pl.ds(k0, tk), pl.ds(col0, tn)]
    return acc + _dot(a, b)

  # The trip count as int32 arithmetic, not jnp.where of two Python ints: Pallas's Triton lowering
  # (JAX 0.10-0.11) turned that select's scalar cases into i1 constants, so scf.for got an i1
  # upper bound beside its i32 lower bound and the module failed to verify on the GPU. Tail
  # visits (group G) and padded no-op visits (no owned rows) run no K step.
  steps = ((group < num_groups) & (hi > lo)).astype(jnp.int32) * num_k
  acc = lax.fori_loop(0, steps, step, jnp.zeros((tm, tn), jnp.float32))
  rows = row0 + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
  owned = (rows >= lo) & (rows < hi)
  plgpu.store(out_ref.at[pl.ds(row0, tm), pl.ds(col0, tn)], acc.astype(out_ref.dtype),
              mask=owned)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tiling: tuple[int, int, int],
        out_dtype, interpret: bool = False, transpose_rhs: bool = False) -> jax.Array:
  """lhs [M, K] x rhs [G, K, N] (or [G, N, K] with transpose_rhs) -> [M, N] in out_dtype;
  M, K, N multiples of the tiles."""
  m, k = lhs.shape
  num_groups, n = rhs.shape[0], rhs.shape[1 if transpose_rhs else 2]
  tm, tk, tn = tiling
  _check_tiles(tm, tk, tn, m, k, n)
  tables = tuple(schedule.gmm_visits(group_sizes, m, tm))
  num_visits = tables[0].shape[0]
  kernel = functools.partial(_gmm_kernel, tm=tm, tk=tk, tn=tn, num_k=k // tk,
                             num_groups=num_groups, num_visits=num_visits, num_n=n // tn,
                             transpose_rhs=transpose_rhs)
  return pl.pallas_call(
      kernel,
      grid=(num_visits * (n // tn),),
      in_specs=[_whole(t.shape) for t in tables] + [_whole(lhs.shape), _whole(rhs.shape)],
      out_specs=_whole((m, n)),
      out_shape=out_struct((m, n), out_dtype, group_sizes, lhs, rhs),
      compiler_params=_compiler_params(lhs.dtype.itemsize, tm * tn, tk * (tm + tn)),
      interpret=interpret,
      name='grouped_matmul',
  )(*tables, lhs, rhs)


# ----------------------------------------------------------------------------------------------
# tgmm


def _tile_of(pid, *, num_k, num_n):
  """tgmm's program id -> (group, K tile, N tile): groups one after another, banded within."""
  per_group = num_k * num_n
  g = lax.div(pid, per_group)
  kb, nb = _banded(pid - g * per_group, num_k, num_n)
  return g, kb, nb


def _tgmm_kernel(offsets_ref, lhs_ref, rhs_ref, out_ref, *, tm, tk, tn, num_k, num_n):
  g, kb, nb = _tile_of(pl.program_id(0), num_k=num_k, num_n=num_n)
  start, end = offsets_ref[g], offsets_ref[g + 1]
  k0 = pl.multiple_of(kb * tk, tk)
  col0 = pl.multiple_of(nb * tn, tn)
  first = lax.div(start, tm)
  steps = (end > start).astype(jnp.int32) * (lax.div(end + tm - 1, tm) - first)  # see _gmm_kernel

  def step(i, acc):
    row0 = pl.multiple_of((first + i) * tm, tm)
    rows = row0 + lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
    mine = (rows >= start) & (rows < end)
    # Only the lhs chunk is masked, inside the load (a zero-filling copy that the pipeliner keeps
    # asynchronous): its zero rows already remove the neighbours' rows from the product. Masking
    # both operands with selects after the loads routed every tile through registers and ran
    # this kernel at ~60 TFLOP/s in the MoE step (profiled on an H200).
    a = plgpu.load(lhs_ref.at[pl.ds(row0, tm), pl.ds(k0, tk)],
                   mask=jnp.broadcast_to(mine, (tm, tk)), other=0)
    b = rhs_ref[pl.ds(row0, tm), pl.ds(col0, tn)]
    return acc + _dot(a, b, trans_a=True)

  acc = lax.fori_loop(0, steps, step, jnp.zeros((tk, tn), jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def tgmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
         tiling: tuple[int, int, int], out_dtype, interpret: bool = False) -> jax.Array:
  """lhs [M, K], rhs [M, N] -> [G, K, N] in out_dtype; M, K, N multiples of the tiles."""
  (m, k), n = lhs.shape, rhs.shape[1]
  num_groups = group_sizes.shape[0]
  tm, tk, tn = tiling
  _check_tiles(tm, tk, tn, m, k, n)
  starts, ends = schedule.group_bounds(group_sizes, m)
  offsets = jnp.append(starts, ends[-1])  # [G + 1]
  tile_of = functools.partial(_tile_of, num_k=k // tk, num_n=n // tn)
  return pl.pallas_call(
      functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn, num_k=k // tk, num_n=n // tn),
      grid=(num_groups * (k // tk) * (n // tn),),
      in_specs=[_whole(offsets.shape), _whole(lhs.shape), _whole(rhs.shape)],
      out_specs=pl.BlockSpec((None, tk, tn), tile_of),
      out_shape=out_struct((num_groups, k, n), out_dtype, group_sizes, lhs, rhs),
      compiler_params=_compiler_params(lhs.dtype.itemsize, tk * tn, tm * (tk + tn)),
      interpret=interpret,
      name='transposed_grouped_matmul',
  )(offsets, lhs, rhs)
