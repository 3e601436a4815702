"""One row times an output-major float weight: a Pallas GEMV kernel for batch-1 decoding.

`gemv_nk(x_row [1, K], w [N, K]) -> [1, N]` in x's dtype, float32 accumulation: reference.py's
product, up to the order of the float32 sum.

Why. Decoding stores some float weights output-major (effjax.compress.weights.OutputMajorWeight,
infer.output_major: attention's `wo` by default), so a one-row product reduces along each
stored row. XLA runs that product as a row reduction at about 1.1 TB/s on an H100 (the out
projection of a 1B model, 8 MB: 7.5 us; experiments/decode_attention), well below the HBM's
rate. The kernel (gpu.py) reads each weight row's entries contiguously into a float32
accumulator and writes the final output in one launch. `infer.output_major_kernel` turns it on
for decoding (OutputMajorWeight.kernel).

Backends: 'triton' (the Pallas kernel, GPU), 'interpret' (the kernel in interpret mode, CPU
tests). Where the kernel should not run (other devices, several rows, a partitioned mesh) the
caller keeps its einsum; this op has no 'auto'. Tiling (bn, bk): `default_tiling`.
"""

from __future__ import annotations

import jax

from effjax.kernels.gemv.reference import gemv_nk_reference

__all__ = ['BACKENDS', 'DEFAULT_BK', 'DEFAULT_BN', 'default_tiling', 'gemv_nk',
           'gemv_nk_reference']

BACKENDS = ('triton', 'interpret')
DEFAULT_BN, DEFAULT_BK = 8, 512  # the int4 output-major kernel's tile (quantized_matmul)


def default_tiling(k: int, n: int) -> tuple[int, int] | None:
  """(bn, bk): DEFAULT_BN x DEFAULT_BK, each halved until it divides; None if nothing fits."""
  bn, bk = DEFAULT_BN, DEFAULT_BK
  while bn > 1 and n % bn:
    bn //= 2
  while bk > 2 and k % bk:
    bk //= 2
  return (bn, bk) if n % bn == 0 and k % bk == 0 else None


def gemv_nk(x_row: jax.Array, w_nk: jax.Array, *, bn: int | None = None, bk: int | None = None,
            backend: str = 'triton') -> jax.Array:
  """x_row [1, K] times w [N, K] (float, stored output-major) -> [1, N] in x's dtype.

  backend 'triton' compiles for the GPU, 'interpret' runs the kernel in interpret mode (CPU).
  bn, bk default to `default_tiling`."""
  from effjax.kernels.gemv import gpu
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
  out = gpu.gemv_nk(x_row, w_nk, bn=bn, bk=bk, interpret=backend == 'interpret')
  return out.reshape(1, n)
