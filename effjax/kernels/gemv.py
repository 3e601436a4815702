"""One row times an output-major float weight: a Pallas GEMV kernel for batch-1 decoding.

`gemv_nk(x_row [1, K], w [N, K]) -> [1, N]` in x's dtype, float32 accumulation, the same values
as `jnp.matmul(x_row, w.T, preferred_element_type=jnp.float32).astype(x_row.dtype)` up to the
order of the float32 sum.

Why. Decoding stores some float weights output-major (effjax.compress.weights.OutputMajorWeight,
infer.output_major: attention's `wo` by default), so a one-row product reduces along each
stored row. XLA runs that product as a row reduction at about 1.1 TB/s on an H100 (the out
projection of a 1B model, 8 MB: 7.5 us; experiments/decode_attention), well below the HBM's
rate. This kernel is the output-major kernels of effjax/kernels/quantized_matmul without the
widening: one program per `bn` output rows, the K loop loading [bn, bk] tiles (each row's
entries contiguous), multiplying them by x's [1, bk] slice into a [bn, bk] float32 accumulator,
and one reduction over K at the end; no split, so its output is final (one launch per product).
`infer.output_major_kernel` turns it on for decoding (OutputMajorWeight.kernel).

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
DEFAULT_BN, DEFAULT_BK = 8, 512
BACKENDS = ('triton', 'interpret')


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


def default_tiling(k: int, n: int) -> tuple[int, int] | None:
  """(bn, bk): DEFAULT_BN x DEFAULT_BK, each halved until it divides; None if nothing fits."""
  bn, bk = DEFAULT_BN, DEFAULT_BK
  while bn > 1 and n % bn:
    bn //= 2
  while bk > 2 and k % bk:
    bk //= 2
  return (bn, bk) if n % bn == 0 and k % bk == 0 else None


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


def gemv_nk(x_row: jax.Array, w_nk: jax.Array, *, bn: int | None = None, bk: int | None = None,
            backend: str = 'triton') -> jax.Array:
  """x_row [1, K] times w [N, K] (float, stored output-major) -> [1, N] in x's dtype.

  backend 'triton' compiles for the GPU, 'interpret' runs the kernel in interpret mode (CPU).
  bn, bk default to `default_tiling`."""
  if backend not in BACKENDS:
    raise ValueError(f'GEMV kernel backend {backend!r}: allowed {", ".join(BACKENDS)}')
  if x_row.ndim != 2 or x_row.shape[0] != 1 or w_nk.ndim != 2 or w_nk.shape[1] != x_row.shape[1]:
    raise ValueError(f'GEMV kernel: x must be one row [1, K] and w [N, K]; got x {x_row.shape}, '
                     f'w {w_nk.shape}')
  n, k = w_nk.shape
  if bn is None or bk is None:
    tiling = default_tiling(k, n)
    if tiling is None:
      raise ValueError(f'GEMV kernel: no tiling of powers of two divides N={n} and K={k}')
    bn, bk = bn or tiling[0], bk or tiling[1]
  check_tiling(k, n, bn=bn, bk=bk)
  kernel = functools.partial(_kernel, bn=bn, bk=bk, steps=k // bk)
  warps = 8 if bn * bk >= 64 * 128 else 4 if bn * bk >= 2048 else 2
  out = pl.pallas_call(
      kernel, grid=(n // bn,),
      in_specs=[_whole(x_row.shape), _whole(w_nk.shape)],
      out_specs=_whole((n, 1)),
      out_shape=out_struct((n, 1), x_row.dtype, x_row, w_nk),
      compiler_params=_CompilerParams(num_warps=warps, num_stages=1),
      interpret=backend == 'interpret', name='gemv_nk',
  )(x_row, w_nk)
  return out.reshape(1, n)
