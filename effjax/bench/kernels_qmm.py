"""The weight-only quantized matmul rows of the kernel benchmark (--op=qmm): decode-sized products.

    python -m effjax.bench kernels --op=qmm [--grid=default|tune|tiny]
        [--impls=bf16,xla_int8,effjax_int8,xla_int4,effjax_int4] [--profile_dir=DIR]

One row multiplies x [M, K] (bf16, M = 1 to 16: the tokens of one decode step) by a [K, N]
weight stored as
  bf16         the plain bf16 matmul x @ w (XLA): the baseline every row is compared with;
  xla_int8     int8 values, one scale per column, through effjax.kernels.quantized_matmul with
  xla_int4     backend 'xla' (dequantize into bf16, then XLA's matmul); int4 packed two a byte,
               one scale per 128 entries of K and column;
  effjax_int8  the same weights through the op's Triton kernel (backend 'triton'; off GPU, in
  effjax_int4  Pallas interpret mode, which checks the path but times nothing meaningful);
  gemv_int8    the op's one-row GEMV kernels (gemv=True: no tensor cores), rows of M = 1 only.
  gemv_int4
Float32 accumulation throughout, output in bf16.

What is timed. A decode step reads every weight of the model once, so a product's cost is the
weight bytes it reads from device memory, a few microseconds per product at these sizes. One
timed call runs `products` such products, each on its own weight (and x), so that a call lasts
long enough for the dispatch not to matter and the weights read in one call (about
ROTATE_BYTES) far exceed the L2 cache (50 MB on an H100 / H200): every product reads its weight
from HBM as in a real decode step. ms is per product; `bytes` is what one product must read
(the stored weight and its scales; x and the output are negligible), GB/s = bytes / ms; with
--profile_dir, profile_ms and device_gb_per_s are the same from the traced device time, without
the dispatch. speedup_vs_baseline is the bf16 row's ms over the row's ms for the same shape.

Before timing each row's first products are checked against the float32 product of the same
stored values (reference.py, HIGHEST precision; the bf16 row against x @ w in float32):
rel_err = ||out - ref|| / ||ref||, the worst over the checked products; beyond 2e-2 the row is
marked check='FAILED' but still timed. The xla rows round the dequantized weight to bf16 (their
rel_err is a few 1e-3); the kernel multiplies the exact stored values.

Grids. 'default': configs/gpt_1b.py's decode shapes (d_model 2048, SwiGLU 5632, 16 heads of 128:
q/k/v/o 2048 x 2048, gate/up 2048 x 5632, down 5632 x 2048, and its unquantized 2048 x 50304
output head) and a larger layer (4096 x 14336 and back), at M = 1, 8, 16. 'tune': the kernel
alone at M = 1 on the gpt_1b shapes and 4096 x 14336 for a list of tilings (bn, bk, split), each
row named 'effjax_int8 bn,bk,split', beside the bf16 row and the default tiling's row, to choose
the defaults from (for gemv_* impls, the GEMV tilings GEMV_TUNE_TILINGS). 'tiny': CPU sizes,
the same code paths, for tests.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from effjax.bench import kernels as kb

INT4_GROUP = 128  # compress.int4_group_size's default
MAX_PRODUCTS = 64  # per timed call; also bounds the arguments of one call (3 arrays a product)
TOLERANCE = 2e-2
CHECKED_PRODUCTS = 2


@dataclasses.dataclass(frozen=True)
class QmmGrid:
  rows: tuple[int, ...]  # M
  shapes: tuple[tuple[int, int], ...]  # (K, N)
  rotate_bytes: int  # weight bytes read per timed call, at least (see the module docstring)


GPT_1B_SHAPES = ((2048, 2048), (2048, 5632), (5632, 2048), (2048, 50304))
QMM_GRIDS = {
    'default': QmmGrid(rows=(1, 8, 16), shapes=GPT_1B_SHAPES + ((4096, 14336), (14336, 4096)),
                       rotate_bytes=512 * 2 ** 20),
    # Batch-1 decoding's per-layer products of configs/gpt_1b.py alone: the quick look.
    'decode': QmmGrid(rows=(1,), shapes=GPT_1B_SHAPES[:3], rotate_bytes=512 * 2 ** 20),
    'tune': QmmGrid(rows=(1,), shapes=GPT_1B_SHAPES[:3] + ((4096, 14336),),
                    rotate_bytes=512 * 2 ** 20),
    'tiny': QmmGrid(rows=(1, 16), shapes=((256, 128), (512, 64)), rotate_bytes=0),
}
# Kinds side by side: consecutive rows of a kind share their inputs (_inputs keeps the latest).
IMPLS = ('bf16', 'xla_int8', 'effjax_int8', 'gemv_int8', 'xla_int4', 'effjax_int4', 'gemv_int4')
# 16 tilings; a shape's invalid ones (split not dividing K's steps) are skipped rows.
TUNE_TILINGS = tuple((bn, bk, split) for bn, bk in ((64, 256), (128, 128), (128, 256), (256, 256))
                     for split in (1, 2, 4, 8))
# The GEMV kernels' tilings: int8 accumulators of 4-8k float32 entries (int4's hold half as many
# rows), 64 to 1024 programs at gpt_1b's widths (invalid ones skipped per shape).
GEMV_TUNE_TILINGS = tuple((bn, bk, split) for bn, bk in ((64, 128), (128, 32), (128, 64), (256, 32))
                          for split in (2, 4, 8, 16))


def weight_bytes(impl: str, k: int, n: int) -> int:
  """Bytes a product reads for its weight: the stored values and their float32 scales."""
  kind = impl.split('_')[-1]
  if kind == 'bf16':
    return 2 * k * n
  if kind == 'int8':
    return k * n + 4 * n
  return k * n // 2 + 4 * (k // INT4_GROUP) * n


def _products(grid: QmmGrid, impl: str, k: int, n: int) -> int:
  return int(min(MAX_PRODUCTS, max(2, math.ceil(grid.rotate_bytes / weight_bytes(impl, k, n)))))


def _weights(key, kind: str, k: int, n: int) -> tuple[jax.Array, ...]:
  """Random stored values and scales of a kind (bf16: a plain weight), scaled like a trained
  projection (outputs of about x's size)."""
  kq, ks = jax.random.split(key)
  if kind == 'bf16':
    return (jax.random.normal(kq, (k, n), jnp.float32) * k ** -0.5).astype(jnp.bfloat16),
  if kind == 'int8':
    q = jax.random.randint(kq, (k, n), -127, 128, jnp.int8)
    return q, jax.random.uniform(ks, (1, n), jnp.float32, 0.5, 1.5) * (k ** -0.5 / 64)
  packed = jax.random.bits(kq, (k // 2, n), jnp.uint8)
  return packed, jax.random.uniform(ks, (k // INT4_GROUP, n), jnp.float32, 0.5, 1.5) * (
      k ** -0.5 / 4)


@functools.lru_cache(maxsize=1)
def _inputs(kind: str, m: int, k: int, n: int, products: int) -> list[tuple]:
  """INPUT_SETS sets, each a tuple of `products` operand tuples (x, weight arrays...); the
  latest kept alive, so the rows of one shape and kind (the tune grid's tilings) share them."""
  fresh = kb._fresh_key()  # pylint: disable=protected-access
  keys = jax.random.split(fresh, kb.INPUT_SETS * products)
  sets = []
  for i in range(kb.INPUT_SETS):
    ops = []
    for key in keys[i * products:(i + 1) * products]:
      kx, kw = jax.random.split(key)
      ops.append((jax.random.normal(kx, (m, k), jnp.bfloat16), *_weights(kw, kind, k, n)))
    sets.append((tuple(ops),))
  return sets


def _product(impl: str, tiling=None):
  """(x, *weight arrays) -> [M, N] bf16 for one implementation."""
  if impl == 'bf16':
    return lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
  from effjax.kernels.quantized_matmul import quantized_matmul
  family, kind = impl.split('_')
  kw: dict[str, Any] = dict(kind=kind, backend='xla')
  if family in ('effjax', 'gemv'):
    kw.update(backend='triton', interpret=jax.default_backend() != 'gpu', tiling=tiling,
              gemv=family == 'gemv')
  return lambda x, q, s: quantized_matmul(x, q, s, **kw)


def _reference(impl: str):
  from effjax.kernels import quantized_matmul as qm
  kind = impl.split('_')[-1]
  if kind == 'bf16':
    return lambda x, w: jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32),
                                   precision=jax.lax.Precision.HIGHEST)
  if kind == 'int8':
    return qm.int8_matmul_reference
  return lambda x, q, s: qm.int4_matmul_reference(x, q, s, INT4_GROUP)


def _all(product):
  """One timed call: the product of every operand tuple of a set."""
  return lambda ops: tuple(product(*args) for args in ops)


def _relative_error(got, want) -> float:
  got, want = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
  return float(jnp.linalg.norm(got - want) / jnp.maximum(jnp.linalg.norm(want), 1e-30))


def _check(impl: str, tiling=None):
  """Before timing: the first products of a set against the float32 reference (module doc)."""
  def check(fn, input_sets):
    del fn  # the same product, called one at a time: checks need not hold every output at once
    product, reference = jax.jit(_product(impl, tiling)), jax.jit(_reference(impl))
    ops = input_sets[0][0][:CHECKED_PRODUCTS]
    errors = [_relative_error(product(*args), reference(*args)) for args in ops]
    if not all(np.isfinite(errors)):
      raise AssertionError(f'non-finite result: relative errors {errors}')
    worst = max(errors)
    return {'rel_err': worst, **({'check': 'FAILED'} if worst > TOLERANCE else {})}
  return check


def _kernel_info(kind: str, m: int, k: int, n: int, tiling,
                 gemv: bool = False) -> tuple[dict[str, Any], str | None]:
  """The kernel's tiling for the row (or why it cannot run: the row is then skipped)."""
  from effjax.kernels import quantized_matmul as qm
  group = INT4_GROUP if kind == 'int4' else None
  if gemv and m != 1:
    return {}, 'the GEMV kernels take one row'
  try:
    chosen = qm.plan(kind, m, k, n, group, backend='triton', tiling=tiling, gemv=gemv)
  except ValueError as e:
    return {}, str(e)
  info = {'backend': 'triton', 'tiling': list(chosen.tiling), 'gemv': chosen.gemv,
          'interpret': jax.default_backend() != 'gpu'}
  return info, None


def qmm_case(grid: QmmGrid, impl: str, *, m: int, k: int, n: int, tiling=None) -> kb.Case:
  kind = impl.split('_')[-1]
  products = _products(grid, impl, k, n)
  info: dict[str, Any] = {'m': m, 'k': k, 'n': n, 'kind': kind, 'dtype': 'bfloat16',
                          'bytes': weight_bytes(impl, k, n)}
  if kind == 'int4':
    info['int4_group'] = INT4_GROUP  # ('group' names the row's shape)
  skip = None
  if impl.startswith(('effjax', 'gemv')):
    extra, skip = _kernel_info(kind, m, k, n, tiling, gemv=impl.startswith('gemv'))
    info.update(extra)
  elif impl.startswith('xla'):
    info['backend'] = 'xla'
  name = impl if tiling is None else f'{impl} {",".join(map(str, tiling))}'
  make = lambda: (_all(_product(impl, tiling)), _inputs(kind, m, k, n, products))
  return kb.Case(group=f'M={m} K={k} N={n}', variant='decode', impl=name, mode='fwd',
                 useful_flops=2.0 * m * k * n, make=make, info=info, skip=skip,
                 check=_check(impl, tiling), products=products)


def qmm_cases(grid_name: str, impls: Sequence[str]) -> Iterator[kb.Case]:
  grid = QMM_GRIDS[grid_name]
  for k, n in grid.shapes:
    for m in grid.rows:
      if grid_name == 'tune':
        yield qmm_case(grid, 'bf16', m=m, k=k, n=n)
        for impl in (i for i in impls if i.startswith(('effjax', 'gemv'))):
          yield qmm_case(grid, impl, m=m, k=k, n=n)  # the default tiling
          for tiling in GEMV_TUNE_TILINGS if impl.startswith('gemv') else TUNE_TILINGS:
            yield qmm_case(grid, impl, m=m, k=k, n=n, tiling=tiling)
        continue
      for impl in impls:
        yield qmm_case(grid, impl, m=m, k=k, n=n)


kb.register(kb.Op(name='qmm', impls=IMPLS, baseline='bf16',
                  grids=('default', 'decode', 'tune', 'tiny'),
                  cases=qmm_cases, dense_variant=None))
