"""Weight-only quantized matmul for small M (decoding) as Pallas kernels for the Triton lowering.

x [Mp, K] (bf16 / f16 / f32, Mp a power of two >= 16, the rows past the real ones zero; a
single row comes unpadded, [1, K], and is broadcast in registers) times
weights stored as int8 [K, N] with one float32 scale per output column, or as int4 packed two to
a byte along K ([K / 2, N] uint8, entry 2i in the low nibble, 2i + 1 in the high one) with one
scale per group of `group` consecutive K entries and column ([K / group, N]); see reference.py.

At decode sizes (M of 1 to 16) the product is bound by reading the weights: the kernels read
each weight byte once, widen it to x's dtype in registers (int8 and int4 values are exact in
bf16 and f16), multiply on the tensor cores with float32 accumulation and apply the scales to
the accumulated products (per column after the K loop for int8; per group to each group's
partial product for int4), so no dequantized copy of a weight is ever written to memory. With
bf16 / f16 x the result is the exact product of x with the dequantized weight up to float32
summation order; float32 x is rounded to TF32 in the dots (Triton's default, like XLA's).

Several weights sharing x (attention's q, k, v) can go in one launch (`*_matmul_many`): the
grid's column tiles are the weights' tiles one after another, and a program loads from and
stores to only the weight its tile falls in (one branch per weight; the others load nothing).

Grid: (N / bn column tiles) x (split K ranges) x (Mp / bm row blocks). With M that small the
N / bn tiles alone are too few programs to keep every SM reading (16 tiles for N = 2048), so K
is split into `split` ranges and each program writes its float32 partial product [bm, bn] into
out[split index]; the caller sums the partials. Only the real rows are stored (a masked store),
so for M = 1 the partials cost split x N floats written and read, not split x 16 x N. Row
blocks exist so that a larger M still runs (each row block re-reads the weights: for M beyond
a few dozen rows XLA's dequantize-and-matmul is the better path, which the op's 'auto' picks).

int4 weights are read as the packed bytes; the two nibbles meet the even and odd K entries of x,
which the caller passes as two arrays (x[:, 0::2], x[:, 1::2]), so no shuffle happens in
registers. A K step of bk entries is done in pieces of min(bk, group) entries that each lie in
one group (two dots of [bm, piece / 2] x [piece / 2, bn] and one scale row per piece): bk and
group need only divide one another, and a piece needs at least 32 entries (Triton's dots need
16 along K, and a piece holds half its entries in each nibble).

Tile rules (checked by `check_tiling`): bm, bn, bk powers of two >= 16 (Triton's smallest dot),
bn dividing N, bk * split dividing K. Shapes reaching the kernels are not padded in K or N:
padding a weight would copy it, the very traffic this kernel exists to avoid.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from effjax.kernels._compat import out_struct

# The Triton compiler-params class has been `CompilerParams` since JAX 0.7; older releases called
# it TritonCompilerParams.
_CompilerParams = getattr(plgpu, 'CompilerParams', None) or plgpu.TritonCompilerParams
MIN_TILE = 16
MIN_INT4_PIECE = 2 * MIN_TILE  # K entries of an int4 piece: MIN_TILE in each nibble's dot
MIN_GEMV_STEP = 2  # the GEMV kernels' smallest K step and int4 piece: one packed row
MAX_ROW_BLOCK = 64  # float32 accumulator rows a program holds; more rows are more row blocks


def _power_of_two(v: int) -> bool:
  return v >= 1 and not v & (v - 1)


def check_tiling(kind: str, mp: int, k: int, n: int, *, bm: int, bn: int, bk: int, split: int,
                 group: int | None = None) -> None:
  """Raises ValueError naming the first kernel constraint (bm, bn, bk, split) the shapes break."""
  for name, tile in (('bm', bm), ('bn', bn), ('bk', bk)):
    if tile < MIN_TILE or not _power_of_two(tile):
      raise ValueError(f'quantized matmul kernel: {name}={tile} must be a power of two >= '
                       f'{MIN_TILE}')
  if mp % bm:
    raise ValueError(f'quantized matmul kernel: bm={bm} must divide the padded rows Mp={mp}')
  if n % bn:
    raise ValueError(f'quantized matmul kernel: bn={bn} must divide N={n}')
  if split < 1 or k % (bk * split):
    raise ValueError(f'quantized matmul kernel: bk x split = {bk} x {split} must divide K={k}')
  if kind == 'int4':
    if group is None or (bk % group and group % bk):
      raise ValueError(f'quantized matmul kernel: int4 bk={bk} and group={group} must divide '
                       'one another')
    if min(bk, group) < MIN_INT4_PIECE:
      raise ValueError(f'quantized matmul kernel: int4 pieces of min(bk, group) = '
                       f'{min(bk, group)} K entries; at least {MIN_INT4_PIECE} needed')


def _dot(a, b):
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _store_rows(o_ref, s, r, col0, acc, *, bm: int, bn: int, rows: int, mp: int):
  """out[s, rows of block r, columns col0:col0+bn] = acc, rows past `rows` left unwritten."""
  row0 = pl.multiple_of(r * bm, bm)
  target = o_ref.at[s, pl.ds(row0, bm), pl.ds(col0, bn)]
  if rows == mp:
    target[...] = acc
    return
  real = row0 + lax.broadcasted_iota(jnp.int32, (bm, bn), 0) < rows
  plgpu.store(target, acc, mask=real)


def _weights(j, tiles: tuple[int, ...], body) -> None:
  """body(w, column tile within weight w) for the weight that column tile j of the launch falls
  in. The launch's column tiles are the weights' tiles one after another (tiles[w] each); only
  the taken branch loads anything, so one launch serves several weights sharing x."""
  if len(tiles) == 1:
    body(0, j)
    return
  start = 0
  for w, count in enumerate(tiles):
    pl.when((j >= start) & (j < start + count))(functools.partial(body, w, j - start))
    start += count


def _x_tile(x_ref, row0, cols, bm: int):
  """[bm, cols] of x from row0. A single-row x (batch-1 decoding, passed unpadded) is
  broadcast to the bm rows a dot needs: every row computes row 0's product, of which only row
  0 is stored, so no padded copy of x is ever made."""
  if x_ref.shape[0] == 1:
    return jnp.broadcast_to(x_ref[pl.ds(0, 1), cols], (bm, cols.size))
  return x_ref[pl.ds(row0, bm), cols]


def _int8_kernel(x_ref, *refs, bm, bn, bk, steps, rows, mp, tiles):
  q_refs, s_refs, o_refs = (refs[i * len(tiles):(i + 1) * len(tiles)] for i in range(3))
  j, s, r = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  row0 = pl.multiple_of(r * bm, bm)
  k_first = s * (steps * bk)

  def product(w, tile):
    col0 = pl.multiple_of(tile * bn, bn)

    def step(i, acc):
      k0 = pl.multiple_of(k_first + i * bk, bk)
      a = _x_tile(x_ref, row0, pl.ds(k0, bk), bm)
      w_tile = q_refs[w][pl.ds(k0, bk), pl.ds(col0, bn)].astype(a.dtype)  # int8: exact in bf16
      return acc + _dot(a, w_tile)

    acc = lax.fori_loop(0, steps, step, jnp.zeros((bm, bn), jnp.float32))
    scale = s_refs[w][pl.ds(0, 1), pl.ds(col0, bn)]
    _store_rows(o_refs[w], s, r, col0, acc * scale, bm=bm, bn=bn, rows=rows, mp=mp)

  _weights(j, tiles, product)


def _nibbles(packed):
  """uint8 [r, c] -> (low, high) int32 values in [-8, 7]. The byte is zero-extended (so no uint8
  shift or sign question reaches Triton), each nibble shifted to the top of the word and shifted
  back arithmetically, which sign-extends it: two integer ops per value, the unpacking being
  what an int4 kernel spends its ALU time on."""
  p = packed.astype(jnp.int32)
  low = lax.shift_right_arithmetic(lax.shift_left(p, 28), 28)
  high = lax.shift_right_arithmetic(lax.shift_left(p, 24), 28)
  return low, high


def _int4_kernel(xe_ref, xo_ref, *refs, bm, bn, bk, group, steps, rows, mp, tiles):
  p_refs, s_refs, o_refs = (refs[i * len(tiles):(i + 1) * len(tiles)] for i in range(3))
  j, s, r = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  row0 = pl.multiple_of(r * bm, bm)
  piece = min(bk, group)  # K entries; one group each
  half = piece // 2  # packed rows of a piece
  k_first = s * (steps * bk)

  def product(w, tile):
    col0 = pl.multiple_of(tile * bn, bn)

    def step(i, acc):
      for p in range(bk // piece):  # unrolled: independent loads the compiler can issue together
        kp = k_first + i * bk + p * piece
        r0 = pl.multiple_of(lax.div(kp, 2), half)
        g = lax.div(kp, group)
        xe = _x_tile(xe_ref, row0, pl.ds(r0, half), bm)
        xo = _x_tile(xo_ref, row0, pl.ds(r0, half), bm)
        low, high = _nibbles(p_refs[w][pl.ds(r0, half), pl.ds(col0, bn)])
        part = _dot(xe, low.astype(xe.dtype)) + _dot(xo, high.astype(xo.dtype))
        acc = acc + part * s_refs[w][pl.ds(g, 1), pl.ds(col0, bn)]
      return acc

    acc = lax.fori_loop(0, steps, step, jnp.zeros((bm, bn), jnp.float32))
    _store_rows(o_refs[w], s, r, col0, acc, bm=bm, bn=bn, rows=rows, mp=mp)

  _weights(j, tiles, product)


def _whole(shape):
  """BlockSpec handing every program the whole array; the kernels slice it with pl.ds."""
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _int4_group(k: int, counts, what: str) -> int:
  """The int4 group size from the weights' group counts (one count, dividing K)."""
  groups = set(counts)
  if len(groups) != 1 or k % next(iter(groups)):
    raise ValueError(f'{what} {sorted(groups)} must be one count dividing K={k}')
  return k // groups.pop()


def _launch(kernel, grid, shared, weights, scales, out_shapes, out_dtype, params, name: str,
            interpret: bool) -> list:
  """The one pallas_call every kernel here makes: each program sees whole arrays (it slices them
  with pl.ds), the inputs being the operands every weight shares (x, or its even and odd
  entries), then the weights, then their scales; one output per weight. Each output varies over
  what x and its own weight vary over (inside shard_map a replicated weight's product stays
  replicated beside a sharded one's)."""
  return list(pl.pallas_call(
      kernel, grid=grid,
      in_specs=[_whole(a.shape) for a in (*shared, *weights, *scales)],
      out_specs=[_whole(shape) for shape in out_shapes],
      out_shape=[out_struct(shape, out_dtype, *shared, w, scale)
                 for shape, w, scale in zip(out_shapes, weights, scales)],
      compiler_params=params, interpret=interpret, name=name,
  )(*shared, *weights, *scales))


def _params(bm: int, bn: int, steps: int):
  """8 warps only for the largest accumulators (at decode sizes 4 warps keep more programs per
  SM). Up to 3 stages let the K loop load the next steps' tiles during the current dot; no more
  stages than steps, since each stage reserves shared memory for a step's tiles, and a program
  with a single step (split-K leaves many such at decode sizes) gains nothing from them but
  fewer programs resident per SM."""
  return _CompilerParams(num_warps=8 if bm * bn >= 64 * 256 else 4,
                         num_stages=max(1, min(3, steps)))


def _tiles_of(kind: str, mp: int, k: int, widths, *, bm, bn, bk, split, group=None):
  """Column tiles per weight after checking the tiling against every weight's shapes."""
  for n in widths:
    check_tiling(kind, mp, k, n, bm=bm, bn=bn, bk=bk, split=split, group=group)
  return tuple(n // bn for n in widths)


def _padded(x, rows: int, bm: int) -> int:
  """Mp, the rows the kernel computes: x's own, or bm for a single unpadded row (rows == 1)."""
  if x.shape[0] == 1 and rows == 1:
    return bm
  return x.shape[0]


def int8_matmul_many(x, qs, scales, *, rows: int, bm: int, bn: int, bk: int, split: int,
                     interpret: bool = False) -> list:
  """x [Mp, K] (or [1, K] for a single row) times each int8 q [K, N_w] * float32 scale
  [1, N_w], in one launch -> float32 partials [split, Mp, N_w] per weight, of which rows
  [0, rows) are written."""
  k = x.shape[1]
  mp = _padded(x, rows, bm)
  widths = [q.shape[1] for q in qs]
  tiles = _tiles_of('int8', mp, k, widths, bm=bm, bn=bn, bk=bk, split=split)
  steps = k // (split * bk)
  kernel = functools.partial(_int8_kernel, bm=bm, bn=bn, bk=bk, steps=steps, rows=rows, mp=mp,
                             tiles=tiles)
  out_shapes = [(split, mp, n) for n in widths]
  return _launch(kernel, (sum(tiles), split, mp // bm), (x,), qs, scales, out_shapes,
                 jnp.float32, _params(bm, bn, steps), 'int8_matmul', interpret)


def int8_matmul(x, q, scale, **kw):
  """x [Mp, K] x int8 q [K, N] * float32 scale [1, N] -> float32 partials [split, Mp, N], of
  which rows [0, rows) are written (the rest is left as allocated). Keywords: int8_matmul_many's."""
  return int8_matmul_many(x, [q], [scale], **kw)[0]


def int4_matmul_many(x_even, x_odd, packs, scales, *, rows: int, bm: int, bn: int, bk: int,
                     split: int, interpret: bool = False) -> list:
  """(x_even, x_odd [Mp, K/2], or [1, K/2] for a single row) times each packed int4 [K/2, N_w]
  with float32 group scales [K/group, N_w] (one group size), in one launch -> float32 partials
  [split, Mp, N_w] each."""
  half_k = x_even.shape[1]
  mp = _padded(x_even, rows, bm)
  k = 2 * half_k
  group = _int4_group(k, [scale.shape[0] for scale in scales], 'int4 matmul: scale rows')
  widths = [p.shape[1] for p in packs]
  tiles = _tiles_of('int4', mp, k, widths, bm=bm, bn=bn, bk=bk, split=split, group=group)
  steps = k // (split * bk)
  kernel = functools.partial(_int4_kernel, bm=bm, bn=bn, bk=bk, group=group, steps=steps,
                             rows=rows, mp=mp, tiles=tiles)
  out_shapes = [(split, mp, n) for n in widths]
  return _launch(kernel, (sum(tiles), split, mp // bm), (x_even, x_odd), packs, scales,
                 out_shapes, jnp.float32, _params(bm, bn, steps), 'int4_matmul', interpret)


def int4_matmul(x_even, x_odd, packed, scale, **kw):
  """(x_even, x_odd [Mp, K/2]) x packed int4 [K/2, N] with float32 group scales [K/group, N]
  -> float32 partials [split, Mp, N], rows [0, rows) written. Keywords: int4_matmul_many's."""
  return int4_matmul_many(x_even, x_odd, [packed], [scale], **kw)[0]


# ----------------------------------------------------------------------------------------------
# A single row (batch-1 decoding) without the tensor cores: the GEMV kernels.
#
# The dot kernels above broadcast one row to Triton's smallest dot (16 rows) and pass each weight
# tile through the dot's operand layout. For one row the product is 2 flops per weight entry,
# which plain FMAs do at far more than the bytes arrive; so these kernels load a [bk, bn] tile
# (N, the stored minor axis, contiguous), widen it to float32, multiply it by x's [bk, 1] column
# and add it into a [bk, bn] float32 accumulator held in registers across the K loop, reducing
# over K once at the end. No dot, no shared-memory layout change, no padded rows. x comes in as
# a column, [K, 1] (int4: its even and odd entries, [K/2, 1] each), a reshape of the row.
# Output: float32 partials [split, N] per weight (split-K as above), the column scale applied
# (int8 after the K loop; int4 per group to each weight tile).
#
# Tile rules (check_gemv_tiling): bn, bk powers of two (bn >= 16, bk >= 2), bn dividing N,
# bk * split dividing K, int4's bk and group (>= 2) dividing one another; the accumulator (bk x bn for
# int8, min(bk, group) / 2 packed rows x bn for int4) at most MAX_GEMV_TILE entries (64
# registers a thread at 4 warps).

MAX_GEMV_TILE = 64 * 128


def check_gemv_tiling(kind: str, k: int, n: int, *, bn: int, bk: int, split: int,
                      group: int | None = None, output_major: bool = False) -> None:
  """Raises ValueError naming the first GEMV kernel constraint the shapes break (output_major:
  the output-major kernels' rules, below: any power-of-two bn, no split)."""
  what = f'quantized {"output-major " if output_major else ""}GEMV kernel'
  smallest_bn = 1 if output_major else MIN_TILE
  if bn < smallest_bn or not _power_of_two(bn):
    raise ValueError(f'{what}: bn={bn} must be a power of two' +
                     ('' if output_major else f' >= {MIN_TILE}'))
  if bk < MIN_GEMV_STEP or not _power_of_two(bk):
    raise ValueError(f'{what}: bk={bk} must be a power of two >= {MIN_GEMV_STEP}')
  # the accumulator's K extent (the output-major int4 kernel holds a whole step's pieces)
  depth = bk if kind == 'int8' else (bk if output_major else min(bk, group or bk)) // 2
  if depth * bn > MAX_GEMV_TILE:
    shape = f'{bn} x {depth} (bn={bn}, bk={bk})' if output_major else (
        f'{depth} x {bn} (bk={bk}, bn={bn})')
    raise ValueError(f'{what}: an accumulator of {shape} exceeds the {MAX_GEMV_TILE} float32 '
                     'entries a program holds')
  if n % bn:
    raise ValueError(f'{what}: bn={bn} must divide N={n}')
  if output_major and (split != 1 or k % bk):
    raise ValueError(f'{what}: bk={bk} must divide K={k} (no split-K)')
  if split < 1 or k % (bk * split):
    raise ValueError(f'{what}: bk x split = {bk} x {split} must divide K={k}')
  if kind == 'int4' and (group is None or (bk % group and group % bk)):
    raise ValueError(f'{what}: int4 bk={bk} and group={group} must divide one another')
  if kind == 'int4' and group < MIN_GEMV_STEP:
    raise ValueError(f'{what}: int4 group={group} must be at least {MIN_GEMV_STEP} entries (one '
                     'packed row)')


def _gemv_loop(steps: int, body, init, unrolled: int = 4):
  """The K loop; a short one (up to `unrolled` steps) is unrolled in Python (the Triton lowering
  takes no scan unroll) so its loads are independent and issue together."""
  if steps <= unrolled:
    for i in range(steps):
      init = body(i, init)
    return init
  return lax.fori_loop(0, steps, body, init)


def _int8_gemv_kernel(x_ref, *refs, bn, bk, steps, tiles):
  q_refs, s_refs, o_refs = (refs[i * len(tiles):(i + 1) * len(tiles)] for i in range(3))
  j, s = pl.program_id(0), pl.program_id(1)
  k_first = s * (steps * bk)

  def product(w, tile):
    col0 = pl.multiple_of(tile * bn, bn)

    def step(i, acc):
      k0 = pl.multiple_of(k_first + i * bk, bk)
      x_col = x_ref[pl.ds(k0, bk), pl.ds(0, 1)].astype(jnp.float32)
      return acc + x_col * q_refs[w][pl.ds(k0, bk), pl.ds(col0, bn)].astype(jnp.float32)

    acc = _gemv_loop(steps, step, jnp.zeros((bk, bn), jnp.float32))
    y = jnp.sum(acc, axis=0) * s_refs[w][0, pl.ds(col0, bn)]
    o_refs[w][s, pl.ds(col0, bn)] = y

  _weights(j, tiles, product)


def _int4_gemv_kernel(xe_ref, xo_ref, *refs, bn, bk, group, steps, tiles):
  p_refs, s_refs, o_refs = (refs[i * len(tiles):(i + 1) * len(tiles)] for i in range(3))
  j, s = pl.program_id(0), pl.program_id(1)
  piece = min(bk, group)  # K entries in one group
  half = piece // 2  # their packed rows
  k_first = s * (steps * bk)

  def product(w, tile):
    col0 = pl.multiple_of(tile * bn, bn)

    def step(i, acc):
      for p in range(bk // piece):
        kp = k_first + i * bk + p * piece
        r0 = pl.multiple_of(lax.div(kp, 2), half)
        low, high = _nibbles(p_refs[w][pl.ds(r0, half), pl.ds(col0, bn)])
        xe = xe_ref[pl.ds(r0, half), pl.ds(0, 1)].astype(jnp.float32)
        xo = xo_ref[pl.ds(r0, half), pl.ds(0, 1)].astype(jnp.float32)
        part = xe * low.astype(jnp.float32) + xo * high.astype(jnp.float32)
        scale = s_refs[w][pl.ds(lax.div(kp, group), 1), pl.ds(col0, bn)]
        acc = acc + part * scale
      return acc

    acc = _gemv_loop(steps, step, jnp.zeros((half, bn), jnp.float32))
    o_refs[w][s, pl.ds(col0, bn)] = jnp.sum(acc, axis=0)

  _weights(j, tiles, product)


def _gemv_params(bk: int, bn: int):
  return _CompilerParams(num_warps=4 if bk * bn <= 32 * 128 else 8, num_stages=1)


def int8_gemv_many(x_col, qs, scales, *, bn: int, bk: int, split: int,
                   interpret: bool = False) -> list:
  """x_col [K, 1] (one row of x as a column) times each int8 q [K, N_w] * float32 scale
  [1, N_w], in one launch -> float32 partials [split, N_w] per weight."""
  k = x_col.shape[0]
  widths = [q.shape[1] for q in qs]
  for width in widths:
    check_gemv_tiling('int8', k, width, bn=bn, bk=bk, split=split)
  tiles = tuple(width // bn for width in widths)
  steps = k // (split * bk)
  kernel = functools.partial(_int8_gemv_kernel, bn=bn, bk=bk, steps=steps, tiles=tiles)
  out_shapes = [(split, width) for width in widths]
  return _launch(kernel, (sum(tiles), split), (x_col,), qs, scales, out_shapes, jnp.float32,
                 _gemv_params(bk, bn), 'int8_gemv', interpret)


def int4_gemv_many(xe_col, xo_col, packs, scales, *, bn: int, bk: int, split: int,
                   interpret: bool = False) -> list:
  """(x's even and odd entries as columns [K/2, 1]) times each packed int4 [K/2, N_w] with
  float32 group scales [K/group, N_w] (one group size), in one launch -> float32 partials
  [split, N_w] each. The accumulator is [min(bk, group) / 2, bn] (packed rows)."""
  k = 2 * xe_col.shape[0]
  group = _int4_group(k, [scale.shape[0] for scale in scales], 'int4 GEMV: scale rows')
  widths = [p.shape[1] for p in packs]
  for width in widths:
    check_gemv_tiling('int4', k, width, bn=bn, bk=bk, split=split, group=group)
  tiles = tuple(width // bn for width in widths)
  steps = k // (split * bk)
  kernel = functools.partial(_int4_gemv_kernel, bn=bn, bk=bk, group=group, steps=steps,
                             tiles=tiles)
  out_shapes = [(split, width) for width in widths]
  return _launch(kernel, (sum(tiles), split), (xe_col, xo_col), packs, scales, out_shapes,
                 jnp.float32, _gemv_params(min(bk, group) // 2, bn), 'int4_gemv', interpret)


# ----------------------------------------------------------------------------------------------
# Output-major GEMV kernels: one row times a weight stored [N, K] (decoding's transposed copy).
#
# The GEMV kernels above read the stored [K, N] layout, whose contiguous axis is N: a program
# needs bn >= 16 columns of a row for whole memory transactions, so N / bn tiles are too few
# programs and K is split, which leaves float32 partials [split, N] to write, read back and sum
# in a further XLA kernel, and a cast to x's dtype, per product. Stored output-major (int8
# [N, K] with scales [N, 1]; int4 [N, K / 2] packed along K, two entries a byte as before, with
# scales [N, K / group]), a weight's rows are its output channels and K is contiguous. A
# program then owns bn whole output rows: it loads [bn, bk] tiles along K (each row's bytes
# contiguous, so any bn reads whole transactions), widens them to float32, multiplies them by
# x's [1, bk] row and adds them into a [bn, bk] float32 accumulator in registers; at the end it
# reduces over K, applies the scale and stores the bn outputs in x's dtype. No split, no
# partials, no second kernel: one launch per product (or per group of weights sharing x), its
# output the final one. The K loop runs unrolled up to MAX_UNROLLED_NK_STEPS steps, so a
# program's loads are independent and in flight together.
# int4 reads its weights through a free 3-D view [N, K / piece, piece / 2] (piece = min(bk,
# group)), so a step's whole groups are one [bn, pieces, piece / 2] load and each group's
# scale broadcasts along the last axis, with no reshape inside the kernel.
#
# Tile rules (check_gemv_nk_tiling): bn, bk powers of two (bn >= 1, bk >= 2), bn dividing N, bk
# dividing K, int4's bk and group dividing one another; the accumulator (bn x bk for int8, bn x
# bk / 2 for int4) at most MAX_GEMV_TILE entries. Outputs are [N, 1] (a column; the
# caller reshapes it to the row [1, N]).

MAX_UNROLLED_NK_STEPS = 16
# How the output-major kernels widen the stored integers to float32 (read at trace time):
# 'magic' builds each float's bits with integer ops, the value v (biased to be non-negative) in
# the mantissa of 2^23, and subtracts 2^23 + bias, which is exact: an AND/XOR and an add per
# value. 'convert' is the int-to-float conversion instruction, which an SM issues at a quarter
# of the rate of the float multiply-adds (16 a clock on Hopper, per the CUDA programming guide),
# fewer than the values an int4 weight delivers a clock at full memory bandwidth. 'words' reads
# the stored bytes as 32-bit words and masks each value in place where its bits lie inside 2^23's
# mantissa (bits 0-22: int4's nibbles 0-4, int8's bytes 0-1), the rest in place after one shift
# of the word (by 12 / 16): 9 integer operations for a word's 8 nibbles and 5 for its 4 bytes,
# where bytes take 2 a value (extract or shift, then mask). Each value's place value stays in the
# float and is undone by x's entries, scaled by its inverse outside the kernel (powers of two:
# exact unless an entry below about 2^-110 in magnitude turns subnormal). A K step or int4 group
# of fewer than 8 int4 entries (min(bk, group) % 8 != 0), or a K step of fewer than 4 int8
# entries, keeps 'magic'.
# Defaults per kind, from the batch-1 decode step of configs/gpt_1b.py on an H100 (two runs,
# experiments/quantized_matmul/README.md): int4 with words at a row tile of 8 and a K step of
# 512 ran 1.29-1.30x bf16 against 1.06x with 'magic' at the same tiling; int8 with words ran
# 1.00-1.06x against 1.11-1.12x with 'magic', so int8 keeps 'magic'. NK_WIDEN, when set, overrides
# both kinds (the checks and the tiling sweep set it).
# 'words_x' is 'words' with x's entries gathered into word order (strided loads of the row) and
# scaled inside the kernel, instead of XLA writing that float32 copy of x before each launch:
# one XLA op fewer per product group where XLA does not fuse the copy into x's producer. On an
# H100 it was slower (int4 0.77x bf16 against words' 1.29x: the strided loads cost more than the
# copy, which XLA fuses into x's producer for most groups anyway), so no kind defaults to it; the
# tiling sweep's 'BN:BK:words_x' compares the two.
DEFAULT_NK_WIDEN = {'int8': 'magic', 'int4': 'words'}
NK_WIDEN: str | None = None
NK_WIDEN_CHOICES = ('magic', 'convert', 'words', 'words_x')
_WORD_MODES = ('words', 'words_x')
# 'words': per kind, (value bits, how many values a word holds in place before the shift, the
# shift, each value's place: its bit position / value bits, after the shift for the later ones).
WORDS = {'int4': (4, 5, 12, (0, 1, 2, 3, 4, 2, 3, 4)), 'int8': (8, 2, 16, (0, 1, 0, 1))}
_TWO_23 = 8388608.0


def nk_widen(kind: str) -> str:
  """The widening the output-major `kind` kernel uses: NK_WIDEN if set, else the kind's default."""
  widen = NK_WIDEN or DEFAULT_NK_WIDEN[kind]
  if widen not in NK_WIDEN_CHOICES:
    raise ValueError(f'output-major widening {widen!r} for {kind}: allowed '
                     f'{", ".join(NK_WIDEN_CHOICES)}')
  return widen


def _widen_int8(q):
  """int8 [r, c] -> float32 values."""
  if nk_widen('int8') == 'convert':
    return q.astype(jnp.float32)
  bits = (q.astype(jnp.int32) & 0xFF) ^ 0x4B000080  # 2^23's bits with v + 128 in the mantissa
  return lax.bitcast_convert_type(bits, jnp.float32) - (_TWO_23 + 128.0)


def _widen_nibbles(packed):
  """uint8 [r, c] -> (low, high) float32 values in [-8, 7]."""
  if nk_widen('int4') == 'convert':
    low, high = _nibbles(packed)
    return low.astype(jnp.float32), high.astype(jnp.float32)
  p = packed.astype(jnp.int32)  # zero-extended
  low = (p & 0xF) ^ 0x4B000008  # two's-complement nibble v: v ^ 8 = v + 8, in 2^23's mantissa
  high = lax.shift_right_logical(p, 4) ^ 0x4B000008
  bias = _TWO_23 + 8.0
  return (lax.bitcast_convert_type(low, jnp.float32) - bias,
          lax.bitcast_convert_type(high, jnp.float32) - bias)


def check_gemv_nk_tiling(kind: str, k: int, n: int, *, bn: int, bk: int,
                         group: int | None = None) -> None:
  """Raises ValueError naming the first output-major GEMV kernel constraint the shapes break."""
  check_gemv_tiling(kind, k, n, bn=bn, bk=bk, split=1, group=group, output_major=True)


def _aligned(v, m: int):
  """v (a Python int in an unrolled loop, else traced) marked a multiple of m."""
  return v if isinstance(v, int) else pl.multiple_of(v, m)


def _widen_word(word, kind: str) -> list:
  """int32 words of 8 int4 / 4 int8 values -> one float32 array per value, value j times
  2^(bits * place j) (exact)."""
  bits, direct, shift, places = WORDS[kind]
  mask, half = (1 << bits) - 1, 1 << (bits - 1)
  shifted = lax.shift_right_logical(word, shift)
  values = []
  for j, place in enumerate(places):
    at = bits * place  # the value's v ^ half = v + half at 2^at, inside 2^23's mantissa
    field = ((word if j < direct else shifted) & (mask << at)) ^ (0x4B000000 | (half << at))
    values.append(lax.bitcast_convert_type(field, jnp.float32) - (_TWO_23 + float(half << at)))
  return values


def _word_x(x_row, kind: str, k: int):
  """x [1, K] as [values a word, K / values a word] float32 in word order, value j's row times
  2^(-bits * place j) ('words')."""
  bits, _, _, places = WORDS[kind]
  scale = jnp.asarray([2.0 ** (-bits * place) for place in places], jnp.float32)
  return (x_row.reshape(k // len(places), len(places)).astype(jnp.float32) * scale).T


def _word_x_tile(x_ref, kind: str, j: int, index):
  """Value j's entries of x in word order, float32, scaled as _word_x scales them, from x's own
  row viewed [..., values a word] ('words_x'): x_ref[index + (j,)] (a strided load)."""
  bits, _, _, places = WORDS[kind]
  return x_ref[index + (j,)].astype(jnp.float32) * (2.0 ** (-bits * places[j]))


def _int8_gemv_nk_kernel(x_ref, *refs, bn, width, steps, tiles, words, x_in_kernel=False):
  # Weights [N, K] int8, x [1, K]; or, words: weights [N, K / 4] int32 words, byte j of word m
  # being entry 4 m + j, and x [4, K / 4] from _word_x, or (x_in_kernel) x's row viewed
  # [K / 4, 4], gathered and scaled here. A step covers `width` columns of bn rows.
  q_refs, s_refs, o_refs = (refs[i * len(tiles):(i + 1) * len(tiles)] for i in range(3))

  def product(w, tile):
    row0 = pl.multiple_of(tile * bn, bn)

    def step(i, acc):
      c0 = _aligned(i * width, width)
      stored = q_refs[w][pl.ds(row0, bn), pl.ds(c0, width)]
      if not words:
        return acc + _widen_int8(stored) * x_ref[pl.ds(0, 1), pl.ds(c0, width)].astype(jnp.float32)
      for j, v in enumerate(_widen_word(stored, 'int8')):
        if x_in_kernel:
          acc = acc + v * _word_x_tile(x_ref, 'int8', j, (pl.ds(c0, width),))[None, :]
        else:
          acc = acc + v * x_ref[pl.ds(j, 1), pl.ds(c0, width)]
      return acc

    acc = _gemv_loop(steps, step, jnp.zeros((bn, width), jnp.float32), MAX_UNROLLED_NK_STEPS)
    y = jnp.sum(acc, axis=1, keepdims=True) * s_refs[w][pl.ds(row0, bn), pl.ds(0, 1)]
    o_refs[w][pl.ds(row0, bn), pl.ds(0, 1)] = y.astype(o_refs[w].dtype)

  _weights(pl.program_id(0), tiles, product)


def _int4_gemv_nk_kernel(*refs, bn, pieces, per_group, steps, tiles, words, x_in_kernel=False):
  # Weights [N, K / piece, piece / 2] and x's halves [1, K / piece, piece / 2], piece =
  # min(bk, group): a step loads `pieces` whole pieces of bn rows as one [bn, pieces, piece / 2]
  # tile, and each piece's scale broadcasts along its last axis (no reshape in the loop).
  # per_group: pieces in a group (1 when a step spans whole groups). words: weights
  # [N, K / piece, piece / 8] int32 words, nibble j of word m of a piece being its entry 8 m + j,
  # and one x [8, K / piece, piece / 8] from _word_x in place of the halves, or (x_in_kernel)
  # x's row viewed [K / piece, piece / 8, 8], gathered and scaled here.
  shared = refs[:1] if words else refs[:2]
  refs = refs[len(shared):]
  tiles_n = len(tiles)
  p_refs, s_refs, o_refs = (refs[i * tiles_n:(i + 1) * tiles_n] for i in range(3))
  width = p_refs[0].shape[2]

  def product(w, tile):
    row0 = pl.multiple_of(tile * bn, bn)

    def step(i, acc):
      j0 = _aligned(i * pieces, pieces)
      stored = p_refs[w][pl.ds(row0, bn), pl.ds(j0, pieces), pl.ds(0, width)]
      x = lambda r, j=0: r[pl.ds(j, 1), pl.ds(j0, pieces), pl.ds(0, width)].astype(jnp.float32)
      if words:
        part = None
        for j, v in enumerate(_widen_word(stored, 'int4')):
          xj = (_word_x_tile(shared[0], 'int4', j, (pl.ds(j0, pieces), pl.ds(0, width)))
                if x_in_kernel else x(shared[0], j))
          part = v * xj if part is None else part + v * xj
      else:
        low, high = _widen_nibbles(stored)
        part = low * x(shared[0]) + high * x(shared[1])
      g0 = j0 if per_group == 1 else (
          i * pieces // per_group if isinstance(i, int) else lax.div(j0, per_group))
      scale = s_refs[w][pl.ds(row0, bn), pl.ds(g0, pieces)]  # pieces > 1 only if per_group == 1
      return acc + part * scale[:, :, None]

    acc = _gemv_loop(steps, step, jnp.zeros((bn, pieces, width), jnp.float32),
                     MAX_UNROLLED_NK_STEPS)
    y = jnp.sum(jnp.sum(acc, axis=2), axis=1, keepdims=True)
    o_refs[w][pl.ds(row0, bn), pl.ds(0, 1)] = y.astype(o_refs[w].dtype)

  _weights(pl.program_id(0), tiles, product)


def _gemv_nk_params(bn: int, cols: int):
  """Warps for a [bn, cols] tile: enough threads that each loads 16 bytes or more of it."""
  return _CompilerParams(num_warps=8 if bn * cols >= 64 * 128 else 4 if bn * cols >= 2048 else 2,
                         num_stages=1)


def int8_gemv_nk_many(x_row, qs, scales, *, bn: int, bk: int, interpret: bool = False) -> list:
  """x_row [1, K] times each output-major int8 q [N_w, K] * float32 scale [N_w, 1], in one
  launch -> [N_w, 1] per weight in x's dtype."""
  k = x_row.shape[1]
  widths = [q.shape[0] for q in qs]
  for width in widths:
    check_gemv_nk_tiling('int8', k, width, bn=bn, bk=bk)
  tiles = tuple(width // bn for width in widths)
  out_shapes = [(width, 1) for width in widths]
  words = nk_widen('int8') in _WORD_MODES and bk % 4 == 0
  x_in_kernel = words and nk_widen('int8') == 'words_x'
  if words:  # free views of the rows as 32-bit words (little-endian: entry 4 m + j is byte j)
    qs = [lax.bitcast_convert_type(q.reshape(q.shape[0], k // 4, 4), jnp.int32) for q in qs]
  kernel = functools.partial(_int8_gemv_nk_kernel, bn=bn, width=bk // 4 if words else bk,
                             steps=k // bk, tiles=tiles, words=words, x_in_kernel=x_in_kernel)
  x = (x_row.reshape(k // 4, 4) if x_in_kernel else _word_x(x_row, 'int8', k) if words
       else x_row)
  return _launch(kernel, (sum(tiles),), (x,), qs, scales, out_shapes, x_row.dtype,
                 _gemv_nk_params(bn, bk),
                 'int8_gemv_nk' + ('_words' if words else '') + ('_x' if x_in_kernel else ''),
                 interpret)


def int4_gemv_nk_many(x_row, packs, scales, *, bn: int, bk: int, interpret: bool = False) -> list:
  """x_row [1, K] times each output-major packed int4 [N_w, K/2] with float32 group scales
  [N_w, K/group] (one group size), in one launch -> [N_w, 1] per weight in x's dtype."""
  k = x_row.shape[1]
  group = _int4_group(k, [scale.shape[1] for scale in scales], 'int4 GEMV: scale columns')
  widths = [p.shape[0] for p in packs]
  for width in widths:
    check_gemv_nk_tiling('int4', k, width, bn=bn, bk=bk, group=group)
  piece = min(bk, group)
  tiles = tuple(width // bn for width in widths)
  out_shapes = [(width, 1) for width in widths]
  words = nk_widen('int4') in _WORD_MODES and piece % 8 == 0
  x_in_kernel = words and nk_widen('int4') == 'words_x'
  if words:  # free views of the packed bytes as 32-bit words (little-endian: nibble j of word m
    # is entry 8 m + j), and x's entries in that order, scaled (or x's row, for the kernel to)
    views = [lax.bitcast_convert_type(p.reshape(p.shape[0], k // 8, 4), jnp.int32).reshape(
        p.shape[0], k // piece, piece // 8) for p in packs]
    shared = [x_row.reshape(k // piece, piece // 8, 8) if x_in_kernel else
              _word_x(x_row, 'int4', k).reshape(8, k // piece, piece // 8)]
  else:  # free views: each row's K / piece pieces of piece / 2 packed bytes; x's even and odd
    # entries (each byte's low and high nibble) alike
    views = [p.reshape(p.shape[0], k // piece, piece // 2) for p in packs]
    shared = [x.reshape(1, k // piece, piece // 2) for x in (x_row[:, 0::2], x_row[:, 1::2])]
  kernel = functools.partial(_int4_gemv_nk_kernel, bn=bn, pieces=bk // piece,
                             per_group=group // piece, steps=k // bk, tiles=tiles, words=words,
                             x_in_kernel=x_in_kernel)
  return _launch(kernel, (sum(tiles),), shared, views, scales, out_shapes, x_row.dtype,
                 _gemv_nk_params(bn, bk // 2),
                 'int4_gemv_nk' + ('_words' if words else '') + ('_x' if x_in_kernel else ''),
                 interpret)
