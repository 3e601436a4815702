"""Weight-only quantized matmul: x times an int8 or packed-int4 weight, for decoding.

`quantized_matmul(x [..., K], qvalue, scale, kind=...)` -> [..., N] in x's dtype, float32
accumulation, with the storage of effjax.compress.quantize flattened to one K and one N axis
(reference.py states it exactly):
  kind='int8'  qvalue int8 [K, N], scale [1, N];
  kind='int4'  qvalue uint8 [K/2, N] (two entries of K a byte), scale [K/group, N]; the group
               size is read from the shapes.

Why a kernel: decoding a batch of a few sequences is bound by reading the weights, so an int8
weight should decode up to 2x and an int4 one up to 4x faster than bf16. Through XLA the weight
is first dequantized into a bf16 copy that the matmul then reads again (a 1B model decoded at
int8 0.65x and int4 0.36x of its bf16 tokens/s on an H200, experiments/compression). The Triton
kernel (gpu.py) reads each quantized byte once and widens it in registers.

Backends:
  'triton'  the Pallas kernel (GPU; interpret=True runs it on CPU for tests);
  'xla'     dequantize (the reference's dequantization, the weight rounded to x's dtype) then one
            dot with float32 accumulation: any device, and the better choice for many rows;
  'auto'    'triton' on GPU when the product has at most MAX_KERNEL_ROWS rows (decode sizes),
            the shapes fit the kernel (`kernel_unsupported`) and no multi-device mesh with
            automatically partitioned axes is active (XLA cannot partition a Pallas call; it
            would gather the weights to every device); 'xla' otherwise. Inside jax.shard_map
            every axis is manual and the kernel runs per device.

Tiling (bn, bk, split): output columns per program, K entries per loop step, and the number of
K ranges whose float32 partial products are summed afterwards (split-K, for enough programs to
keep every SM reading). `default_tiling` fits them to the shapes; a given tiling is checked and
a violated constraint named (gpu.check_tiling). Rows are zero-padded to a power of two >= 16
(Triton's smallest dot), in row blocks of at most 64 (a single row is not: the kernel broadcasts
it in registers, so batch-1 decoding makes no padded copy); K and N are never padded (that would
copy the weight): shapes the kernel cannot tile go to 'xla' under 'auto' and are an error naming the
reason under 'triton'. The one-row GEMV kernels (gemv=True) have no dot, so they also take K
steps and int4 groups below 16 / 32 entries (down to 2: `kernel_unsupported(..., gemv=True)`).

Differentiation (reverse mode only): the kernel path is wrapped in a custom_vjp whose backward
is the 'xla' path's VJP (cotangents for x and the scales; none for the integer values), so a
quantized model fine-tunes its other parameters on any backend; the 'xla' path is plain JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp

from effjax.kernels._compat import partitioned_mesh
from effjax.kernels.quantized_matmul.reference import (
  dequantize_int4,
  dequantize_int8,
  int4_matmul_reference,
  int8_matmul_reference,
  unpack_int4,
)

__all__ = [
  'KINDS',
  'QMM_BACKENDS',
  'default_gemv_nk_tiling',
  'default_gemv_tiling',
  'default_tiling',
  'dequantize_int4',
  'dequantize_int8',
  'int4_matmul_reference',
  'int8_matmul_reference',
  'kernel_unsupported',
  'plan',
  'quantized_matmul',
  'quantized_matmul_many',
  'resolve_backend',
  'unpack_int4',
]

QMM_BACKENDS = ('auto', 'triton', 'xla')
KINDS = ('int8', 'int4')
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
# Rows up to which 'auto' takes the kernel on GPU. Beyond a few dozen rows the product stops
# being bound by reading the weights (and the kernel re-reads them for every 64-row block), so
# XLA's matmul over a dequantized copy should do better; the benchmark's M = 16 rows show how
# the kernel fares on the way there (effjax/bench/kernels_qmm.py).
MAX_KERNEL_ROWS = 64
MIN_ROWS = 16  # Triton's smallest dot
DEFAULT_BN = 128
DEFAULT_BK = {'int8': 128, 'int4': 128}
# Programs to aim for when choosing split: several per SM of an H100 / H200 (132 SMs). A
# program's K range is short (one or two steps), so nothing is pipelined inside it; many
# programs in flight are what keeps loads outstanding on every SM. Chosen on gpt_1b's batch-1
# decode step on an H200 (experiments/quantized_matmul/tune_decode.py): BK 128 with 512-1024
# programs decoded 1.20-1.21x bf16, the earlier BK 256 with 256 programs 1.06x / 1.01x.
TARGET_PROGRAMS = 1024
# The GEMV kernels (one row, no tensor cores; gpu.py): their default tile and the programs split-K
# aims for. Each program's accumulator stays in registers over its K range.
DEFAULT_GEMV_BN = 128
DEFAULT_GEMV_BK = {'int8': 64, 'int4': 128}
TARGET_GEMV_PROGRAMS = 512


def _tiles(dim: int, largest: int, smallest: int | None = None) -> list[int]:
  """Powers of two in [smallest (MIN_TILE), largest] dividing dim, largest first."""
  from effjax.kernels.quantized_matmul import gpu
  out, tile = [], smallest or gpu.MIN_TILE
  while tile <= min(dim, largest):
    if dim % tile == 0:
      out.append(tile)
    tile *= 2
  return out[::-1]


def _int4_fits(bk: int, group: int | None, piece: int) -> bool:
  return (group is not None and (bk % group == 0 or group % bk == 0) and
          min(bk, group) >= piece)


def _k_steps(kind: str, k: int, group: int | None, gemv: bool = False) -> list[int]:
  """The K steps (bk) the kernel can take for these shapes, largest first. The dot kernels
  need steps of at least MIN_TILE (Triton's smallest dot) and int4 pieces of MIN_INT4_PIECE
  (MIN_TILE in each nibble's dot); the GEMV kernels multiply elementwise, so steps and pieces of
  MIN_GEMV_STEP entries (one packed int4 row) do."""
  from effjax.kernels.quantized_matmul import gpu
  tiles = _tiles(k, k, gpu.MIN_GEMV_STEP if gemv else gpu.MIN_TILE)
  if kind != 'int4':
    return tiles
  piece = gpu.MIN_GEMV_STEP if gemv else gpu.MIN_INT4_PIECE
  return [t for t in tiles if _int4_fits(t, group, piece)]


def _widths(n) -> tuple[int, ...]:
  """N of one weight, or the Ns of several read by one launch, as a tuple."""
  return (int(n),) if isinstance(n, numbers.Integral) else tuple(int(w) for w in n)


def kernel_unsupported(kind: str, k: int, n, group: int | None = None, *,
                       gemv: bool = False) -> str | None:
  """Why the kernel cannot tile these shapes, or None when it can. N must split into
  power-of-two column tiles of at least 16; the dot kernels need K steps of at least 16 and int4
  groups in pieces of at least 32 entries, the one-row GEMV kernels (gemv=True) K steps and
  int4 pieces of at least 2. n: one N or the Ns of weights sharing a launch."""
  from effjax.kernels.quantized_matmul import gpu
  for width in _widths(n):
    if width % gpu.MIN_TILE:
      return f'N={width} is not a multiple of {gpu.MIN_TILE}'
  smallest = gpu.MIN_GEMV_STEP if gemv else gpu.MIN_TILE
  if k % smallest:
    return f'K={k} is not a multiple of {smallest}'
  if not _k_steps(kind, k, group, gemv):
    piece = gpu.MIN_GEMV_STEP if gemv else gpu.MIN_INT4_PIECE
    return (f'int4 groups of {group} entries (K={k}): the {"GEMV" if gemv else "dot"} kernel '
            f'needs groups of at least {piece} entries that a power-of-two K step divides or is '
            'divided by')
  return None


def _padded_rows(rows: int) -> int:
  return max(MIN_ROWS, 1 << (max(rows, 1) - 1).bit_length())


def _fitted(kind: str, k: int, n, group: int | None, *, bn_max: int, bk_max: int,
            row_blocks: int, target: int, what: str,
            gemv: bool = False) -> tuple[int, int, int]:
  """(bn, bk, split): the largest power-of-two column tile up to bn_max dividing every N, the
  K step up to bk_max (int4: whose pieces fit the groups), then the largest split of K's steps
  keeping the programs (column tiles x row_blocks x split) within `target`."""
  reason = kernel_unsupported(kind, k, n, group, gemv=gemv)
  if reason:
    raise ValueError(f'the quantized {what} kernel cannot tile these shapes: {reason}')
  widths = _widths(n)
  bn = _tiles(math.gcd(*widths), bn_max)[0]
  steps = _k_steps(kind, k, group, gemv)
  # The default step where it fits; else the smallest allowed one above it (int4 groups larger
  # than the default step divide no smaller one).
  bk = next((t for t in steps if t <= bk_max), steps[-1])
  blocks, count = (sum(widths) // bn) * row_blocks, k // bk
  split = max(d for d in range(1, count + 1)
              if count % d == 0 and (d == 1 or blocks * d <= target))
  return bn, bk, split


def default_tiling(kind: str, rows: int, k: int, n,
                   group: int | None = None) -> tuple[int, int, int]:
  """(bn, bk, split) for the dot kernels (`_fitted` with DEFAULT_BN, DEFAULT_BK and
  TARGET_PROGRAMS; each row block of up to MAX_ROW_BLOCK rows is its own set of programs)."""
  from effjax.kernels.quantized_matmul import gpu
  mp = _padded_rows(rows)
  return _fitted(kind, k, n, group, bn_max=DEFAULT_BN, bk_max=DEFAULT_BK[kind],
                 row_blocks=mp // min(mp, gpu.MAX_ROW_BLOCK), target=TARGET_PROGRAMS,
                 what='matmul')


def default_gemv_tiling(kind: str, k: int, n, group: int | None = None) -> tuple[int, int, int]:
  """(bn, bk, split) for the one-row GEMV kernels (`_fitted` with DEFAULT_GEMV_BN,
  DEFAULT_GEMV_BK and TARGET_GEMV_PROGRAMS), checked against their accumulator limit."""
  from effjax.kernels.quantized_matmul import gpu
  bn, bk, split = _fitted(kind, k, n, group, bn_max=DEFAULT_GEMV_BN, bk_max=DEFAULT_GEMV_BK[kind],
                          row_blocks=1, target=TARGET_GEMV_PROGRAMS, what='GEMV', gemv=True)
  for width in _widths(n):
    gpu.check_gemv_tiling(kind, k, width, bn=bn, bk=bk, split=split, group=group)
  return bn, bk, split


# The output-major GEMV kernels (weights stored [N, K] for decoding; gpu.py): rows of output per
# program and K entries per step, at most. A program's accumulator is [bn, bk] (int4: [bn, bk /
# 2] packed columns, whole groups or one group's part); 8 rows of 512 int8 entries are 4 KB a
# load, 16 bytes for each of 256 threads. int4 takes 8 rows of 512 with its default word
# widening (gpu.DEFAULT_NK_WIDEN): on gpt_1b's decode step (tune_decode.py --nk, one H100, two
# runs) 0.84-0.85 ms a token against 0.93 at 16 x 512, 1.03-1.04 at 4 x 1024 or 4 x 512 and 1.21
# at 8 x 256, all with words; with bytes 4 x 1024 had been best (one H200).
DEFAULT_GEMV_NK_BN = {'int8': 8, 'int4': 8}
DEFAULT_GEMV_NK_BK = {'int8': 512, 'int4': 512}
# Per-K replacements of the two limits above, (kind, K) -> (bn, bk), for products whose input
# width tunes differently (gpt_1b's down projection has K = 5632, its other products 2048).
# Empty: every K takes the kind's limits. tune_decode.py --nk sweeps entries (BN:BK@K).
DEFAULT_GEMV_NK_BY_K: dict[tuple[str, int], tuple[int, int]] = {}


def _nk_unsupported(kind: str, k: int, group: int | None) -> str | None:
  """Why the output-major GEMV kernels cannot take K (and int4's group), or None."""
  if not _k_steps(kind, k, group, gemv=True):
    if kind == 'int8' or k % 2:
      return f'K={k} is not a multiple of 2'
    return (f'int4 groups of {group} entries (K={k}): the output-major GEMV kernel needs groups '
            'of at least 2 entries that a power-of-two K step divides or is divided by')
  return None


def default_gemv_nk_tiling(kind: str, k: int, n, group: int | None = None) -> tuple[int, int, int]:
  """(bn, bk, 1) for the output-major GEMV kernels: the largest power-of-two row tile up to
  DEFAULT_GEMV_NK_BN dividing every N and the largest K step up to DEFAULT_GEMV_NK_BK (both
  replaced by DEFAULT_GEMV_NK_BY_K's entry for (kind, K) if there is one; int4:
  dividing or divided by the group) whose accumulator fits; no split."""
  from effjax.kernels.quantized_matmul import gpu
  reason = _nk_unsupported(kind, k, group)
  if reason:
    raise ValueError(f'the quantized output-major GEMV kernel cannot tile these shapes: {reason}')
  widths = _widths(n)
  common = math.gcd(*widths)
  bn_max, bk_max = DEFAULT_GEMV_NK_BY_K.get((kind, k),
                                            (DEFAULT_GEMV_NK_BN[kind], DEFAULT_GEMV_NK_BK[kind]))
  bn = min(common & -common, bn_max)
  steps = _k_steps(kind, k, group, gemv=True)
  bk = next((t for t in steps if t <= bk_max), steps[-1])
  cols = bk if kind == 'int8' else bk // 2
  while bn * cols > gpu.MAX_GEMV_TILE and bn > 1:
    bn //= 2
  for width in widths:
    gpu.check_gemv_nk_tiling(kind, k, width, bn=bn, bk=bk, group=group)
  return bn, bk, 1


def resolve_backend(backend: str, rows: int | None = None) -> str:
  """'auto' -> 'triton' on GPU for at most MAX_KERNEL_ROWS rows outside an automatically
  partitioned multi-device mesh, else 'xla'. (Shape fit is checked by `plan`.)"""
  if backend not in QMM_BACKENDS:
    raise ValueError(f'backend must be one of {QMM_BACKENDS}, got {backend!r}')
  if backend != 'auto':
    return backend
  if jax.default_backend() != 'gpu' or partitioned_mesh():
    return 'xla'
  return 'triton' if rows is not None and rows <= MAX_KERNEL_ROWS else 'xla'


@dataclasses.dataclass(frozen=True)
class Plan:
  """What quantized_matmul will do for given shapes: the backend, and the kernel's tiling."""
  backend: str
  tiling: tuple[int, int, int] | None = None  # (bn, bk, split) for 'triton'
  reason: str = ''  # why 'auto' fell back to 'xla' for shape reasons ('' otherwise)
  gemv: bool = False  # 'triton' with one row: the GEMV kernels (else the dot kernels)
  output_major: bool = False  # the weights stored [N, K]: the output-major GEMV kernels


def plan(kind: str, rows: int, k: int, n, group: int | None = None, *,
         backend: str = 'auto', tiling=None, gemv: bool = False,
         output_major: bool = False) -> Plan:
  """The backend and tiling for x [rows, K] x a [K, N] weight of `kind` (group: int4's); n a
  sequence of Ns plans one launch over several weights sharing x. gemv: a single row takes the
  GEMV kernels (gpu.py), with their own default tiling and rules. output_major: the weights are
  stored [N, K] (decoding's transposed copy); a single row on the kernel path takes the
  output-major GEMV kernels (tiling (bn, bk, 1)), anything else the 'xla' path."""
  resolved = resolve_backend(backend, rows)
  if resolved == 'xla':
    return Plan('xla')
  if output_major:
    return _plan_output_major(kind, rows, k, n, group, backend=backend, tiling=tiling)
  gemv = gemv and rows == 1
  reason = kernel_unsupported(kind, k, n, group, gemv=gemv)
  if reason and backend == 'auto':
    return Plan('xla', reason=reason)
  if reason:
    raise ValueError(f"backend='triton': the quantized matmul kernel cannot tile these shapes: "
                     f"{reason}; use backend='xla' or 'auto'")
  if tiling is not None and len(tiling) != 3:
    raise ValueError(f'tiling must be (bn, bk, split), got {tiling!r}')
  from effjax.kernels.quantized_matmul import gpu
  if gemv:
    if tiling is None:
      return Plan('triton', default_gemv_tiling(kind, k, n, group), gemv=True)
    bn, bk, split = (int(t) for t in tiling)
    for width in _widths(n):
      gpu.check_gemv_tiling(kind, k, width, bn=bn, bk=bk, split=split, group=group)
    return Plan('triton', (bn, bk, split), gemv=True)
  if tiling is None:
    return Plan('triton', default_tiling(kind, rows, k, n, group))
  bn, bk, split = (int(t) for t in tiling)
  mp = _padded_rows(rows)
  for width in _widths(n):
    gpu.check_tiling(kind, mp, k, width, bm=min(mp, gpu.MAX_ROW_BLOCK), bn=bn, bk=bk,
                     split=split, group=group)
  return Plan('triton', (bn, bk, split))


def _plan_output_major(kind: str, rows: int, k: int, n, group: int | None, *, backend: str,
                       tiling) -> Plan:
  if rows != 1:  # the dot kernels read [K, N]; more rows of an output-major weight go to XLA
    return Plan('xla', reason=f'{rows} rows: output-major weights take the kernel for one row')
  reason = _nk_unsupported(kind, k, group)
  if reason and backend == 'auto':
    return Plan('xla', reason=reason)
  if reason:
    raise ValueError(f"backend='triton': the quantized output-major GEMV kernel cannot tile "
                     f"these shapes: {reason}; use backend='xla' or 'auto'")
  if tiling is None:
    return Plan('triton', default_gemv_nk_tiling(kind, k, n, group), gemv=True,
                output_major=True)
  if len(tiling) != 3 or int(tiling[2]) != 1:
    raise ValueError(f'an output-major GEMV tiling is (bn, bk, 1) (no split-K), got {tiling!r}')
  from effjax.kernels.quantized_matmul import gpu
  bn, bk = int(tiling[0]), int(tiling[1])
  for width in _widths(n):
    gpu.check_gemv_nk_tiling(kind, k, width, bn=bn, bk=bk, group=group)
  return Plan('triton', (bn, bk, 1), gemv=True, output_major=True)


# ----------------------------------------------------------------------------------------------
# The two paths


@dataclasses.dataclass(frozen=True)
class _Static:
  kind: str
  group: int | None
  tiling: tuple[int, int, int]
  interpret: bool
  gemv: bool = False
  output_major: bool = False


def _dequantized(qvalue, scale, kind: str, group: int | None, dtype) -> jax.Array:
  w = dequantize_int8(qvalue, scale) if kind == 'int8' else dequantize_int4(qvalue, scale, group)
  return w.astype(dtype)


def _xla_product(x_mk, qvalue, scale, kind: str, group: int | None,
                 output_major: bool = False) -> jax.Array:
  """The 'xla' path: the weight dequantized into x's dtype, one dot, float32 accumulation.
  An output-major weight ([N, K] and its scales [N, rows]) is transposed back first, which XLA
  fuses into the dequantization."""
  if output_major:
    qvalue, scale = qvalue.T, scale.T
  w = _dequantized(qvalue, scale, kind, group, x_mk.dtype)
  return jnp.matmul(x_mk, w, preferred_element_type=jnp.float32).astype(x_mk.dtype)


def _kernel_impl(x_mk, qvalues, scales, static: _Static) -> tuple:
  from effjax.kernels.quantized_matmul import gpu
  rows = x_mk.shape[0]
  mp = _padded_rows(rows)
  bm = min(mp, gpu.MAX_ROW_BLOCK)
  bn, bk, split = static.tiling
  scales = [scale.astype(jnp.float32) for scale in scales]
  if static.output_major:  # one row: outputs [N, 1] in x's dtype, final (no split)
    kw = dict(bn=bn, bk=bk, interpret=static.interpret)
    if static.kind == 'int8':
      outs = gpu.int8_gemv_nk_many(x_mk, qvalues, scales, **kw)
    else:
      outs = gpu.int4_gemv_nk_many(x_mk, qvalues, scales, **kw)
    return tuple(out.reshape(1, -1) for out in outs)
  if static.gemv:  # one row, as a column: [1, K] -> [K, 1] is a reshape
    kw = dict(bn=bn, bk=bk, split=split, interpret=static.interpret)
    x_col = x_mk.reshape(-1, 1)
    if static.kind == 'int8':
      partials = gpu.int8_gemv_many(x_col, qvalues, scales, **kw)
    else:
      partials = gpu.int4_gemv_many(x_col[0::2], x_col[1::2], qvalues, scales, **kw)
    return tuple((p if split == 1 else jnp.sum(p, axis=0, keepdims=True)).astype(x_mk.dtype)
                 for p in partials)
  # One row (batch-1 decoding) goes in as it is and the kernel broadcasts it; more are padded.
  x_pad = jnp.pad(x_mk, ((0, mp - rows), (0, 0))) if mp != rows and rows > 1 else x_mk
  kw = dict(rows=rows, bm=bm, bn=bn, bk=bk, split=split, interpret=static.interpret)
  if static.kind == 'int8':
    partials = gpu.int8_matmul_many(x_pad, qvalues, scales, **kw)
  else:
    partials = gpu.int4_matmul_many(x_pad[:, 0::2], x_pad[:, 1::2], qvalues, scales, **kw)
  # Only rows [0, rows) were written; slicing before the sum keeps the reduction's reads to them.
  return tuple((p[0, :rows] if split == 1 else jnp.sum(p[:, :rows], axis=0)).astype(x_mk.dtype)
               for p in partials)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _kernel_products(x_mk, qvalues: tuple, scales: tuple, static: _Static) -> tuple:
  return _kernel_impl(x_mk, qvalues, scales, static)


def _kernel_fwd(x_mk, qvalues, scales, static: _Static):
  return _kernel_impl(x_mk, qvalues, scales, static), (x_mk, qvalues, scales)


def _kernel_bwd(static: _Static, residuals, d_outs):
  x_mk, qvalues, scales = residuals

  # The XLA path's own VJP: the same function, so the same cotangents (and shard_map's psums of
  # the replicated scale's cotangent come from JAX's autodiff, not from here).
  def products(x, scales):
    return tuple(_xla_product(x, q, s, static.kind, static.group, static.output_major)
                 for q, s in zip(qvalues, scales))

  _, pullback = jax.vjp(products, x_mk, tuple(scales))
  d_x, d_scales = pullback(tuple(d.astype(x_mk.dtype) for d in d_outs))
  return d_x, tuple(None for _ in qvalues), d_scales


_kernel_products.defvjp(_kernel_fwd, _kernel_bwd)


# ----------------------------------------------------------------------------------------------
# The op


def _check(x, qvalue, scale, kind: str) -> tuple[int, int, int | None]:
  """(K, N, group or None) after checking shapes and dtypes; one error naming the problem."""
  if kind not in KINDS:
    raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
  if x.ndim < 1 or jnp.dtype(x.dtype) not in DTYPES:
    raise ValueError(f'x must be [..., K] in bfloat16, float16 or float32, got {x.dtype} '
                     f'{x.shape}')
  k = x.shape[-1]
  want = jnp.dtype(jnp.int8 if kind == 'int8' else jnp.uint8)
  if qvalue.ndim != 2 or jnp.dtype(qvalue.dtype) != want:
    layout = '[K, N]' if kind == 'int8' else '[K/2, N], two entries a byte'
    raise ValueError(f'{kind} qvalue must be 2-D {want} {layout}, got {qvalue.dtype} '
                     f'{qvalue.shape}')
  n = qvalue.shape[1]
  rows_needed = k if kind == 'int8' else k / 2
  if qvalue.shape[0] != rows_needed:
    raise ValueError(f'{kind} qvalue must have {"K" if kind == "int8" else "K/2"}='
                     f'{rows_needed:g} rows for x [..., K={k}], got shape {qvalue.shape}')
  if scale.ndim != 2 or scale.shape[1] != n or not jnp.issubdtype(scale.dtype, jnp.floating):
    raise ValueError(f'scale must be a float [rows, N={n}] array, got {scale.dtype} '
                     f'{scale.shape}')
  if kind == 'int8':
    if scale.shape[0] != 1:
      raise ValueError(f'int8 scale must be [1, N] (one scale per output column), got shape '
                       f'{scale.shape}')
    return k, n, None
  groups = scale.shape[0]
  if groups < 1 or k % groups:
    raise ValueError(f'int4 scale must be [K/group, N] with its rows dividing K={k}, got shape '
                     f'{scale.shape}')
  return k, n, k // groups


def quantized_matmul(x: jax.Array, qvalue: jax.Array, scale: jax.Array, *, kind: str,
                     backend: str = 'auto', interpret: bool = False,
                     tiling: tuple[int, int, int] | None = None,
                     gemv: bool = False, output_major: bool = False) -> jax.Array:
  """x [..., K] times a weight-only quantized [K, N] weight -> [..., N] in x's dtype.

  kind 'int8': qvalue int8 [K, N], scale [1, N]; kind 'int4': qvalue uint8 [K/2, N] (entry 2i
  the low nibble, 2i + 1 the high one), scale [K/group, N]. Float32 accumulation. backend and
  tiling (bn, bk, split) as in the module docstring; interpret=True runs the Pallas kernel in
  interpret mode (CPU tests). gemv=True: a single row on the kernel path (batch-1 decoding)
  takes the GEMV kernels (no tensor cores; gpu.py), tiling then being theirs.
  output_major=True: the weight is stored transposed, int8 qvalue [N, K] with scale [N, 1], int4
  [N, K/2] (packed along K as above) with scale [N, K/group]; a single row on the kernel path
  takes the output-major GEMV kernels (tiling (bn, bk, 1)), more rows the 'xla' path.
  Reverse-mode differentiable in x and scale.
  """
  return quantized_matmul_many(x, [(qvalue, scale)], kind=kind, backend=backend,
                               interpret=interpret, tiling=tiling, gemv=gemv,
                               output_major=output_major)[0]


def quantized_matmul_many(x: jax.Array, weights, *, kind: str, backend: str = 'auto',
                          interpret: bool = False,
                          tiling: tuple[int, int, int] | None = None,
                          gemv: bool = False, output_major: bool = False) -> list[jax.Array]:
  """[x times each weight] for weights = [(qvalue, scale), ...] of one kind (and, for int4, one
  group size), each as in quantized_matmul: on the kernel path one launch reads them all, its
  column tiles running over the weights one after another (attention's q, k and v, or SwiGLU's
  gate and up, share x), so a decode step pays one launch and one x load for them, not one
  each. The plan (backend, tiling) is made for the weights together: bn divides every N, and
  split aims at TARGET_PROGRAMS over all their column tiles. output_major: every weight stored
  transposed, as in quantized_matmul."""
  if not weights:
    raise ValueError('quantized_matmul_many needs at least one (qvalue, scale) weight')
  if output_major:  # checked as the [K, N] weights they are transposes of
    t = lambda a: jax.ShapeDtypeStruct(a.shape[::-1], a.dtype) if a.ndim == 2 else a
    try:
      checked = [_check(x, t(qvalue), t(scale), kind) for qvalue, scale in weights]
    except ValueError as e:
      raise ValueError(f'output_major=True (weights stored [N, K], checked as their [K, N] '
                       f'transposes): {e}') from None
  else:
    checked = [_check(x, qvalue, scale, kind) for qvalue, scale in weights]
  k = checked[0][0]
  widths = tuple(n for _, n, _ in checked)
  groups = {group for _, _, group in checked}
  if len(groups) != 1:
    raise ValueError(f'int4 weights sharing a product must have one group size, got '
                     f'{sorted(groups)}')
  group = groups.pop()
  lead = x.shape[:-1]
  rows = math.prod(lead)
  chosen = plan(kind, rows, k, widths, group, backend=backend, tiling=tiling, gemv=gemv,
                output_major=output_major)
  x_mk = x.reshape(rows, k)
  if chosen.backend == 'xla':
    outs = [_xla_product(x_mk, qvalue, scale, kind, group, output_major)
            for qvalue, scale in weights]
  elif rows == 0:
    outs = [jnp.zeros((0, n), x.dtype) for n in widths]
  else:
    outs = _kernel_products(x_mk, tuple(q for q, _ in weights), tuple(s for _, s in weights),
                            _Static(kind, group, chosen.tiling, bool(interpret), chosen.gemv,
                                    chosen.output_major))
  return [out.reshape(*lead, n) for out, n in zip(outs, widths)]
