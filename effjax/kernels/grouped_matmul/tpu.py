"""Grouped matmul as Pallas Mosaic kernels (TPU), driven by scalar-prefetched visit tables.

The visit tables (schedule.py: per visit an m-tile, a group, owned rows [lo, hi)) travel as
scalar prefetch into SMEM, so the BlockSpec index_maps can pick each step's blocks from them:
the pipeline fetches exactly the lhs / rhs tiles a visit needs, and a block index that does not
change between steps costs no DMA.

gmm, grid (N tiles, visits, K tiles). Steps over K accumulate lhs[tile, k] @ rhs[group, k, n] in
a float32 VMEM scratch; on the last K step the visit merges its owned rows into the output block:
out = where(row in [lo, hi), acc, out). The output block is indexed by the visit's m-tile, and all
visits to one tile are consecutive, so the block stays resident in VMEM while each visit fills its
own rows, and is written back to HBM once, when the tile changes. Every row of a tile is owned by
exactly one visit (the tail segment's visits own the rows past the groups and merge zeros), so no
uninitialised VMEM reaches HBM. Tail and no-op visits skip the dot and pin their lhs / rhs block
indices to K tile 0, so they fetch nothing new while the K axis runs.

tgmm, grid (K tiles, N tiles, visits). Each visit adds masked(lhs tile)^T @ masked(rhs tile) for
its owned rows to a float32 scratch; the output block [group, k, n] stays resident while the
group's visits run; the accumulator is zeroed on a group's first visit and stored on its last.
Empty groups own one visit with no rows, so their output block is written as zeros.

Every grid axis that carries state (visits, and K for gmm) is 'arbitrary'; the N / K tile axes
in front are independent and 'parallel' (split across TensorCores where a chip has two).

Blocks: tm, tk, tn multiples of 128, so every block's last two dims are whole (8, 128) tiles for
any dtype and the transposed tgmm operand is lane-aligned too. Shapes are padded to tile
multiples by the caller (__init__.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from effjax.kernels._compat import out_struct
from effjax.kernels.grouped_matmul import schedule

TILE_ALIGN = 128
_NN = (((1,), (0,)), ((), ()))  # a [m, k] x b [k, n] -> [m, n]


def default_tiling(n: int = 0, op: str = 'gmm') -> tuple[int, int, int]:
  """(tm, tk, tn) before fitting to the shapes. Unmeasured on hardware: 128-row m-tiles keep the
  work repeated on group boundaries small; 512-wide K / N tiles keep the MXU fed per DMA
  (bf16: 0.5 MiB per lhs / rhs block, 1 MiB float32 accumulator, well inside scoped VMEM).
  """
  del n, op
  return 128, 512, 512


def _check_tiles(tm: int, tk: int, tn: int, m: int, k: int, n: int) -> None:
  for name, tile, dim in (('tm', tm, m), ('tk', tk, k), ('tn', tn, n)):
    if tile < TILE_ALIGN or tile % TILE_ALIGN or dim % tile:
      raise ValueError(f"mosaic grouped matmul needs {name} a multiple of {TILE_ALIGN} dividing "
                       f"{dim}, got {tile}; pick another tiling or backend='ragged_dot'")


def _interpret(interpret: bool):
  return pltpu.InterpretParams() if interpret else False


def _owned_rows(tile, lo, hi, shape) -> jax.Array:
  """bool `shape`: which rows of the [tm, ...] block starting at row tile * tm lie in [lo, hi)."""
  rows = tile * shape[0] + lax.broadcasted_iota(jnp.int32, shape, 0)
  return (rows >= lo) & (rows < hi)


# ----------------------------------------------------------------------------------------------
# gmm


def _gmm_kernel(tile_ref, group_ref, lo_ref, hi_ref, lhs_ref, rhs_ref, out_ref, acc_ref, *,
                num_groups):
  v, kk = pl.program_id(1), pl.program_id(2)

  @pl.when(kk == 0)
  def _zero():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(group_ref[v] < num_groups)
  def _accumulate():
    acc_ref[...] += lax.dot_general(lhs_ref[...], rhs_ref[...], _NN,
                                    preferred_element_type=jnp.float32)

  @pl.when(kk == pl.num_programs(2) - 1)
  def _merge():
    owned = _owned_rows(tile_ref[v], lo_ref[v], hi_ref[v], out_ref.shape)
    # Select in float32: chips without bf16 VPU arithmetic lower f32 selects everywhere.
    merged = jnp.where(owned, acc_ref[...], out_ref[...].astype(jnp.float32))
    out_ref[...] = merged.astype(out_ref.dtype)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tiling: tuple[int, int, int],
        out_dtype, interpret: bool = False) -> jax.Array:
  """lhs [M, K] x rhs [G, K, N] -> [M, N] in out_dtype; M, K, N multiples of the tiles."""
  (m, k), (num_groups, _, n) = lhs.shape, rhs.shape
  tm, tk, tn = tiling
  _check_tiles(tm, tk, tn, m, k, n)
  tables = tuple(schedule.gmm_visits(group_sizes, m, tm))

  def k_block(v, kk, group_ref):  # tail and no-op visits stay on K tile 0: nothing to fetch
    return jnp.where(group_ref[v] < num_groups, kk, 0)

  def lhs_block(nb, v, kk, tile_ref, group_ref, *_):
    return tile_ref[v], k_block(v, kk, group_ref)

  def rhs_block(nb, v, kk, tile_ref, group_ref, *_):
    return jnp.minimum(group_ref[v], num_groups - 1), k_block(v, kk, group_ref), nb

  def out_block(nb, v, kk, tile_ref, *_):
    return tile_ref[v], nb

  return pl.pallas_call(
      functools.partial(_gmm_kernel, num_groups=num_groups),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(tables),
          grid=(n // tn, tables[0].shape[0], k // tk),
          in_specs=[pl.BlockSpec((tm, tk), lhs_block),
                    pl.BlockSpec((None, tk, tn), rhs_block)],
          out_specs=pl.BlockSpec((tm, tn), out_block),
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)]),
      out_shape=out_struct((m, n), out_dtype, group_sizes, lhs, rhs),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'arbitrary', 'arbitrary')),
      interpret=_interpret(interpret),
      name='grouped_matmul',
  )(*tables, lhs, rhs)


# ----------------------------------------------------------------------------------------------
# tgmm


def _tgmm_kernel(tile_ref, group_ref, lo_ref, hi_ref, lhs_ref, rhs_ref, out_ref, acc_ref):
  v, last = pl.program_id(2), pl.num_programs(2) - 1
  group = group_ref[v]
  starts_group = (v == 0) | (group_ref[jnp.maximum(v - 1, 0)] != group)
  ends_group = (v == last) | (group_ref[jnp.minimum(v + 1, last)] != group)
  tile, lo, hi = tile_ref[v], lo_ref[v], hi_ref[v]

  @pl.when(starts_group)
  def _zero():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(lo < hi)
  def _accumulate():
    # Zero the rows of other groups in both operands (0 * inf would still be NaN). Masking and
    # the transpose run on 32-bit values, the layouts every TPU generation handles.
    lhs = jnp.where(_owned_rows(tile, lo, hi, lhs_ref.shape), lhs_ref[...].astype(jnp.float32), 0)
    rhs = jnp.where(_owned_rows(tile, lo, hi, rhs_ref.shape), rhs_ref[...].astype(jnp.float32), 0)
    acc_ref[...] += lax.dot_general(lhs.T.astype(lhs_ref.dtype), rhs.astype(rhs_ref.dtype), _NN,
                                    preferred_element_type=jnp.float32)

  @pl.when(ends_group)
  def _store():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
         tiling: tuple[int, int, int], out_dtype, interpret: bool = False) -> jax.Array:
  """lhs [M, K], rhs [M, N] -> [G, K, N] in out_dtype; M, K, N multiples of the tiles."""
  (m, k), n = lhs.shape, rhs.shape[1]
  num_groups = group_sizes.shape[0]
  tm, tk, tn = tiling
  _check_tiles(tm, tk, tn, m, k, n)
  tables = tuple(schedule.tgmm_visits(group_sizes, m, tm))
  return pl.pallas_call(
      _tgmm_kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(tables),
          grid=(k // tk, n // tn, tables[0].shape[0]),
          in_specs=[pl.BlockSpec((tm, tk), lambda kb, nb, v, tile_ref, *_: (tile_ref[v], kb)),
                    pl.BlockSpec((tm, tn), lambda kb, nb, v, tile_ref, *_: (tile_ref[v], nb))],
          out_specs=pl.BlockSpec((None, tk, tn),
                                 lambda kb, nb, v, tile_ref, group_ref, *_: (group_ref[v], kb, nb)),
          scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)]),
      out_shape=out_struct((num_groups, k, n), out_dtype, group_sizes, lhs, rhs),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'arbitrary')),
      interpret=_interpret(interpret),
      name='transposed_grouped_matmul',
  )(*tables, lhs, rhs)
