"""The output-major GEMV as a Pallas kernel for the Triton lowering (see __init__.py).

One program per `bn` output rows: the K loop loads [bn, bk] tiles of the weight (each row's
entries contiguous), multiplies them by x's [1, bk] slice into a [bn, bk] float32 accumulator,
and reduces over K once at the end; no split, so the output is final (one launch per product).
The structure of effjax/kernels/quantized_matmul's output-major kernels without the widening.

Tile rules (`check_tiling`): bn and bk powers of two, bn dividing N, bk dividing K, the
accumulator bn x bk at most MAX_TILE float32 entries.
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
MAX_TILE = 64 * 128
MAX_UNROLLED_STEPS = 16


def _power_of_two(v: int) -> bool:
  return v >= 1 and not v & (v - 1)


def check_tiling(k: int, n: int, *, bn: int, bk: int) -> None:
  """Raises ValueError naming the first rule the shapes or the tiling break."""
  if not _power_of_two(bn):
    raise ValueError(f'GEMV kernel: bn={bn} must be a power of two')
  if bk < 2 or not _power_of_two(bk):
    raise ValueError(f'GEMV kernel: bk={bk} must be a power of two >= 2')
  if bn * bk > MAX_TILE:
    raise ValueError(f'GEMV kernel: an accumulator of {bn} x {bk} exceeds the {MAX_TILE} float32 '
                     'entries a program holds')
  if n % bn:
    raise ValueError(f'GEMV kernel: bn={bn} must divide N={n}')
  if k % bk:
    raise ValueError(f'GEMV kernel: bk={bk} must divide K={k}')


def _kernel(x_ref, w_ref, o_ref, *, bn, bk, steps):
  row0 = pl.multiple_of(pl.program_id(0) * bn, bn)

  def step(i, acc):
    c0 = i * bk if isinstance(i, int) else pl.multiple_of(i * bk, bk)
    w = w_ref[pl.ds(row0, bn), pl.ds(c0, bk)].astype(jnp.float32)
    return acc + w * x_ref[pl.ds(0, 1), pl.ds(c0, bk)].astype(jnp.float32)

  init = jnp.zeros((bn, bk), jnp.float32)
  if steps <= MAX_UNROLLED_STEPS:  # unrolled: the steps' loads are independent, in flight together
    acc = init
    for i in range(steps):
      acc = step(i, acc)
  else:
    acc = lax.fori_loop(0, steps, step, init)
  y = jnp.sum(acc, axis=1, keepdims=True)
  o_ref[pl.ds(row0, bn), pl.ds(0, 1)] = y.astype(o_ref.dtype)


def _whole(shape):
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def gemv_nk(x_row: jax.Array, w_nk: jax.Array, *, bn: int, bk: int,
            interpret: bool = False) -> jax.Array:
  """x_row [1, K] times w [N, K] -> [N, 1] in x's dtype (the tiling checked first)."""
  n, k = w_nk.shape
  check_tiling(k, n, bn=bn, bk=bk)
  kernel = functools.partial(_kernel, bn=bn, bk=bk, steps=k // bk)
  warps = 8 if bn * bk >= 64 * 128 else 4 if bn * bk >= 2048 else 2
  return pl.pallas_call(
      kernel, grid=(n // bn,),
      in_specs=[_whole(x_row.shape), _whole(w_nk.shape)],
      out_specs=_whole((n, 1)),
      out_shape=out_struct((n, 1), x_row.dtype, x_row, w_nk),
      compiler_params=_CompilerParams(num_warps=warps, num_stages=1),
      interpret=interpret, name='gemv_nk',
  )(x_row, w_nk)
