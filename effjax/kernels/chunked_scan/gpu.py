"""The chunked scan's four steps (chunked.py) as Pallas kernels for the Triton lowering (GPU).

The op is decayed linear attention cut into chunks of C tokens; chunked.py gives the math of each
step and the weights (b, doc, u, w, carry) that plain JAX precomputes. Three kernels serve the
four steps:

  scan      chunk_states and chunk_state_grads, the two steps that carry a [K, V] state from
            chunk to chunk. One program per (batch x head, K block, V block) keeps its float32
            [bk, bv] slice of the state in registers and walks the chunks in a lax.fori_loop,
            forwards for the states (emit S_c, then S_{c+1} = carry_c S_c + (w_c k_c)^T v_c)
            or backwards for their cotangents (emit G_{c+1}, then
            G_c = carry_c G_{c+1} + scale (u_c q_c)^T do_c). Every state element depends only on
            its own row block of k (or q) and column block of v (or do), so the K x V blocks
            are independent programs and the grid has B * H * (K / bk) * (V / bv) of them,
            enough to fill the GPU without splitting the sequence.
  output    chunk_output. One program per (chunk, batch x head, V block):
            o = scale [((q k^T) * D) v + u * (q S_c)], with the [C, C] intra-chunk decay D built
            in registers from b and doc (exp2 of differences of b log2(e), masked causally and
            by document), never stored.
  backward  chunk_backward. One program per (chunk, batch x head) computes dq, dk and dv
            together: the two [C, C] matrices p = scale (q k^T) * D and dp = scale (do v^T) * D
            are built once and feed all three gradients, so q, k, v, do, S_c and G_{c+1} are
            read once per chunk and no [C, C] matrix goes through memory. The three outputs are
            computed one after another and each slice is stored as soon as it is done, so one
            float32 accumulator is live at a time next to p and dp. backward_config can also
            split a chunk's gradient columns over `split` programs (each recomputes p and dp and
            reads the state rows / columns of its share): fewer registers a program, more
            recomputation; it measured no better, so it is off.

Precision. Matmul inputs are in the inputs' dtype (a common one when q, k, v, do differ) and
accumulate in float32; float32 intermediates (p, dp, w * k, and the float32 state S_c or G_{c+1})
are cast to that dtype right before their dot, as flash attention does with its probabilities.
With float32 inputs the dots ask for full float32 precision (Triton's 'ieee', not TF32), so the
kernels match the plain-JAX steps to float32 rounding. States and gradients come out float32, o
in v's dtype. float16 inputs put the state and the unnormalised scores through float16, whose
range (65504) a long undecayed sequence can exceed; bfloat16 has float32's range.

Tiling. Head dims are powers of two in [16, 256] and chunks powers of two in [16, 128]
(validate): Triton tiles must be powers of two and its dots want every side >= 16. The output and
backward kernels take head dims in slices of at most 128 (_SUB), looping over the slices of a
256-wide head statically, so no tile exceeds [C, 128] or [128, 128] and one kernel serves every
head size. The scan's state tile is 64 x 64, halved to 32 on a side while the grid would have
fewer than _MIN_PROGRAMS = 132 programs (one per H100 / H200 multiprocessor), since a sequential
program hides latency only through the programs running beside it.

Measured (one H200, JAX 0.11.2, Triton 3.6, bf16 with segment ids, B4 S4096 H16 K = V = 128
unless said; ranges over up to three runs; jitted calls, device-resident inputs):
  kernels at C = 64: chunk_states 145 us, chunk_output 164-175, chunk_state_grads 145,
    chunk_backward 545-586 with float32 gradients, 367-374 with bf16 ones (which it now emits,
    with the decay term q . dq - k . dk summed in the kernel; not re-timed end to end).
  op: forward 309-321 us (51-53M tokens/s); forward + backward 1278-1367 us against cuDNN causal
    attention's 2022-2069 (1.6x faster); B1 S16384: 1688-1765 against 6661-6800 (3.9-4.0x);
    B4 S1024: 371 against 278 (slower: linear attention wins from a few thousand tokens);
    Mamba-2-like B4 S4096 H32 K128 V64: forward 384, forward + backward 1601.
  choices: DEFAULT_CHUNK = 64 (C = 128: forward 297-300 but forward + backward 1570-1597, its
    backward kernel is slower); scan 64 x 64 tile, 4 warps, 3 stages (147 us; 32 x 32 260, 64 x 32
    180, 8 warps 187, 2 stages 167; at B1 S16384 the small-grid rule's 32 x 32 ran 287 against
    355 for 64 x 64); output kernel 4 warps at C <= 64 (8: 249), 8 at C = 128 (4: 258); backward
    4 warps at C <= 64 (8: 608-611), 8 at C = 128 (4: 1534); _SUB = 128 (64 is slower in both
    kernels). Processing several chunks per program with a pipelined loop ran out of shared memory
    (its stages hold float32 state tiles) or was slower (output kernel, 2 chunks: 172 us).
  The backward kernel is latency-bound: Nsight Compute showed 255 registers a thread, one program
    per multiprocessor at 8 warps and 36% of DRAM bandwidth. Emitting float32 gradients cost a
    third of its time plus an XLA pass casting them; it now emits them in the inputs' dtype and
    the per-token decay term beside them (that version is untimed).
Unmeasured: tiles, warps and stages for float32 and float16 inputs (measured only for accuracy),
and any GPU other than the H200. The output and backward kernels have no loop, so their
num_stages does nothing and is left at 1.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# The Triton compiler-params class has been `CompilerParams` since JAX 0.7; older releases called
# it TritonCompilerParams.
_CompilerParams = getattr(plgpu, 'CompilerParams', None) or plgpu.TritonCompilerParams

DEFAULT_CHUNK = 64
CHUNKS = (16, 32, 64, 128)
HEAD_DIMS = (16, 32, 64, 128, 256)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))

_LOG2E = math.log2(math.e)
_SUB = 128  # widest head-dim slice one dot of the output / backward kernels takes
_SCAN_TILE = 64  # the scan's state tile side, before shrinking for a small grid
_MIN_SCAN_TILE = 32
_MIN_PROGRAMS = 132
_SCAN_WARPS = 4
_SCAN_STAGES = 3  # the next chunks' k and v tiles load while the state updates


def validate(*, chunk: int, key_dim: int, value_dim: int, dtype) -> None:
  """One ValueError naming the first constraint of this backend that the op's shapes break."""
  if chunk not in CHUNKS:
    raise ValueError(f"chunk_size={chunk} must be a power of two in [16, 128] for "
                     f"backend='triton'; use backend='xla'")
  for name, dim in (('key_dim', key_dim), ('value_dim', value_dim)):
    if dim not in HEAD_DIMS:
      raise ValueError(f"{name}={dim} must be a power of two in [16, 256] for backend='triton'; "
                       f"pad the heads or use backend='xla'")
  if jnp.dtype(dtype) not in DTYPES:
    raise ValueError(f"dtype={jnp.dtype(dtype).name} must be bfloat16, float16 or float32 for "
                     f"backend='triton'; cast the inputs")


def _compute_dtype(*arrays):
  """The matmul input dtype: the arrays' common one (float32 when bf16 meets f16)."""
  return jnp.dtype(jnp.result_type(*(x.dtype for x in arrays)))


def _dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
  """2-D matmul, float32 accumulation; float32 operands get full precision instead of TF32."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _intra_decay(b, doc):
  """D [C, C] float32 (query i, key j) = exp(b_i - b_j) [j <= i] [doc_i == doc_j].

  A disallowed pair's exponent becomes -inf before the exp (exp2 of it is exactly 0), so the
  positive differences above the diagonal never overflow into the product."""
  c = b.shape[0]
  rows = jnp.arange(c, dtype=jnp.int32)[:, None]
  cols = jnp.arange(c, dtype=jnp.int32)[None, :]
  allowed = (cols <= rows) & (doc[:, None] == doc[None, :])
  b2 = b * _LOG2E
  return jnp.exp2(jnp.where(allowed, b2[:, None] - b2[None, :], -jnp.inf))


def _batch_head(bh, heads: int):
  """A program's batch x head index -> (batch, head)."""
  return lax.div(bh, heads), lax.rem(bh, heads)


def _at(bh, heads: int, row, *rest):
  """The block index of a [B, T or n, H, ...] array: (batch, row block, head, *rest)."""
  batch, head = _batch_head(bh, heads)
  return (batch, row, head, *rest)


def _check_length(t: int, chunk: int) -> int:
  if t % chunk:
    raise ValueError(f'sequence length {t} is not a multiple of chunk={chunk}; the op pads it')
  return t // chunk


# ----------------------------------------------------------------------------------------------
# The scan over chunks: chunk_states (forward) and chunk_state_grads (reverse).


def scan_tiles(batch_heads: int, key_dim: int, value_dim: int) -> tuple[int, int]:
  """(bk, bv) of the scan: 64 x 64, shrunk while the grid would be too small to fill the GPU."""
  bk, bv = min(key_dim, _SCAN_TILE), min(value_dim, _SCAN_TILE)
  programs = lambda: batch_heads * (key_dim // bk) * (value_dim // bv)
  while programs() < _MIN_PROGRAMS and max(bk, bv) > _MIN_SCAN_TILE:
    if bv >= bk:
      bv //= 2
    else:
      bk //= 2
  return bk, bv


def _scan_kernel(a_ref, x_ref, weight_ref, carry_ref, start_ref, emit_ref, last_ref, *,
                 chunk: int, n: int, reverse: bool, mult: float, dtype):
  def step(i, state):
    c = n - 1 - i if reverse else i
    emit_ref[c, :, :] = state
    rows = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
    weight = weight_ref[rows]
    if mult != 1.0:
      weight = weight * mult
    # The weight scales the contracted (token) axis, so it cannot move outside the dot: it is
    # applied in float32 to the [C, bk] operand and rounded once to the matmul dtype.
    a = (a_ref[rows, :].astype(jnp.float32) * weight[:, None]).astype(dtype)
    x = x_ref[rows, :].astype(dtype)
    return carry_ref[c] * state + _dot(a, x, trans_a=True)

  last_ref[...] = lax.fori_loop(0, n, step, start_ref[...].astype(jnp.float32))


def _scan(a, x, weight, carry, start, *, chunk: int, reverse: bool, mult: float,
          interpret: bool, block_k: int | None = None, block_v: int | None = None):
  """(emitted [B, n, H, K, V], last [B, H, K, V]) float32; see chunked._scan for the contract."""
  bsz, t, h, dk = a.shape
  dv = x.shape[-1]
  n = _check_length(t, chunk)
  bk, bv = scan_tiles(bsz * h, dk, dv)
  bk, bv = block_k or bk, block_v or bv
  dtype = _compute_dtype(a, x)
  a_spec = pl.BlockSpec((None, t, None, bk), lambda bh, i, j: _at(bh, h, 0, i))
  x_spec = pl.BlockSpec((None, t, None, bv), lambda bh, i, j: _at(bh, h, 0, j))
  row_spec = lambda length: pl.BlockSpec((None, length, None), lambda bh, i, j: _at(bh, h, 0))
  state_spec = pl.BlockSpec((None, None, bk, bv), lambda bh, i, j: (*_batch_head(bh, h), i, j))
  emit_spec = pl.BlockSpec((None, n, None, bk, bv), lambda bh, i, j: _at(bh, h, 0, i, j))
  kernel = functools.partial(_scan_kernel, chunk=chunk, n=n, reverse=reverse, mult=float(mult),
                             dtype=dtype)
  return pl.pallas_call(
      kernel,
      grid=(bsz * h, dk // bk, dv // bv),
      in_specs=[a_spec, x_spec, row_spec(t), row_spec(n), state_spec],
      out_specs=[emit_spec, state_spec],
      out_shape=[jax.ShapeDtypeStruct((bsz, n, h, dk, dv), jnp.float32),
                 jax.ShapeDtypeStruct((bsz, h, dk, dv), jnp.float32)],
      compiler_params=_CompilerParams(num_warps=_SCAN_WARPS, num_stages=_SCAN_STAGES),
      interpret=interpret,
      name='chunked_scan_state_grads' if reverse else 'chunked_scan_states',
  )(a, x, weight.astype(jnp.float32), carry.astype(jnp.float32), start)


def chunk_states(k, v, w, carry, initial, *, chunk: int, interpret: bool = False):
  """(states entering each chunk [B, n, H, K, V], final state [B, H, K, V]), float32."""
  return _scan(k, v, w, carry, initial, chunk=chunk, reverse=False, mult=1.0,
               interpret=interpret)


def chunk_state_grads(q, do, u, carry, d_final, *, chunk: int, scale: float,
                      interpret: bool = False):
  """(G_{c+1} = dL/d(state leaving chunk c) [B, n, H, K, V], dL/d(initial state)), float32."""
  return _scan(q, do, u, carry, d_final, chunk=chunk, reverse=True, mult=scale,
               interpret=interpret)


# ----------------------------------------------------------------------------------------------
# Per-chunk output.


def _output_kernel(q_ref, k_ref, v_ref, b_ref, doc_ref, u_ref, s_ref, o_ref, *, scale: float,
                   sub: int, dtype):
  chunk, dk = q_ref.shape
  scores = jnp.zeros((chunk, chunk), jnp.float32)
  inter = jnp.zeros(o_ref.shape, jnp.float32)
  for lo in range(0, dk, sub):
    q = q_ref[:, lo:lo + sub].astype(dtype)
    scores += _dot(q, k_ref[:, lo:lo + sub].astype(dtype), trans_b=True)
    inter += _dot(q, s_ref[lo:lo + sub, :].astype(dtype))
  p = (scores * (scale * _intra_decay(b_ref[...], doc_ref[...]))).astype(dtype)
  # u scales query rows, so it is applied to q S after the dot rather than to q before it.
  o = _dot(p, v_ref[...].astype(dtype)) + (scale * u_ref[...])[:, None] * inter
  o_ref[...] = o.astype(o_ref.dtype)


def output_warps(chunk: int) -> int:
  return 4 if chunk <= 64 else 8


def _output(q, k, v, b, doc, u, states, *, chunk: int, scale: float, interpret: bool,
            block_v: int | None = None, sub: int = _SUB):
  bsz, t, h, dk = q.shape
  dv = v.shape[-1]
  n = _check_length(t, chunk)
  bv = block_v or min(dv, _SUB)
  dtype = _compute_dtype(q, k, v)
  qk_spec = pl.BlockSpec((None, chunk, None, dk), lambda c, bh, j: _at(bh, h, c, 0))
  v_spec = pl.BlockSpec((None, chunk, None, bv), lambda c, bh, j: _at(bh, h, c, j))
  row_spec = pl.BlockSpec((None, chunk, None), lambda c, bh, j: _at(bh, h, c))
  doc_spec = pl.BlockSpec((None, chunk), lambda c, bh, j: (_batch_head(bh, h)[0], c))
  state_spec = pl.BlockSpec((None, None, None, dk, bv), lambda c, bh, j: _at(bh, h, c, 0, j))
  kernel = functools.partial(_output_kernel, scale=float(scale), sub=min(sub, dk), dtype=dtype)
  return pl.pallas_call(
      kernel,
      grid=(n, bsz * h, dv // bv),
      in_specs=[qk_spec, qk_spec, v_spec, row_spec, doc_spec, row_spec, state_spec],
      out_specs=v_spec,
      out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype),
      compiler_params=_CompilerParams(num_warps=output_warps(chunk), num_stages=1),
      interpret=interpret,
      name='chunked_scan_output',
  )(q, k, v, b.astype(jnp.float32), doc.astype(jnp.int32), u.astype(jnp.float32), states)


def chunk_output(q, k, v, b, doc, u, states, *, chunk: int, scale: float,
                 interpret: bool = False):
  """o [B, T, H, V] in v's dtype."""
  return _output(q, k, v, b, doc, u, states, chunk=chunk, scale=scale, interpret=interpret)


# ----------------------------------------------------------------------------------------------
# Per-chunk backward: dq, dk, dv in one program.


def _slices(start, width: int, sub: int):
  """(input slice, output slice, sub) triples covering input columns [start, start + width) in
  pieces of `sub`; the output slice is the same piece's place in the program's own block."""
  if isinstance(start, int):
    return [(slice(start + lo, start + lo + sub), slice(lo, lo + sub), sub)
            for lo in range(0, width, sub)]
  return [(pl.ds(pl.multiple_of(start + lo, sub), sub), slice(lo, lo + sub), sub)
          for lo in range(0, width, sub)]


def _backward_kernel(q_ref, k_ref, v_ref, do_ref, b_ref, doc_ref, u_ref, w_ref, s_ref, g_ref,
                     dq_ref, dk_ref, dv_ref, db_ref, *, split: int, scale: float, sub: int,
                     dtype):
  chunk, dk = q_ref.shape
  dv = v_ref.shape[1]
  bk, bv = dq_ref.shape[1], dv_ref.shape[1]  # this program's share of the K and V columns
  j = pl.program_id(0) if split > 1 else 0
  all_k, all_v = _slices(0, dk, min(sub, dk)), _slices(0, dv, min(sub, dv))
  own_k, own_v = _slices(j * bk, bk, min(sub, bk)), _slices(j * bv, bv, min(sub, bv))
  load = lambda ref, cols: ref[:, cols].astype(dtype)
  state = lambda ref, ks, vs: ref[ks, vs].astype(dtype)

  decay = scale * _intra_decay(b_ref[...], doc_ref[...])
  qk = jnp.zeros((chunk, chunk), jnp.float32)
  for ks, _, _ in all_k:
    qk += _dot(load(q_ref, ks), load(k_ref, ks), trans_b=True)
  dov = jnp.zeros((chunk, chunk), jnp.float32)
  for vs, _, _ in all_v:
    dov += _dot(load(do_ref, vs), load(v_ref, vs), trans_b=True)
  p = (qk * decay).astype(dtype)  # scale (q k^T) * D
  dp = (dov * decay).astype(dtype)  # scale (do v^T) * D
  u = scale * u_ref[...]
  w = w_ref[...]

  # Each gradient slice is finished and stored before the next starts, keeping one float32
  # accumulator live at a time; the log-decay term q . dq - k . dk is summed from the float32
  # slices on the way, so the gradients themselves may leave in the inputs' dtype.
  db = jnp.zeros((chunk,), jnp.float32)
  for ks, out, width in own_k:
    from_state = jnp.zeros((chunk, width), jnp.float32)
    for vs, _, _ in all_v:
      from_state += _dot(load(do_ref, vs), state(s_ref, ks, vs), trans_b=True)
    dq = _dot(dp, load(k_ref, ks)) + u[:, None] * from_state
    db += jnp.sum(q_ref[:, ks].astype(jnp.float32) * dq, axis=1)
    dq_ref[:, out] = dq.astype(dq_ref.dtype)
    from_state = jnp.zeros((chunk, width), jnp.float32)
    for vs, _, _ in all_v:
      from_state += _dot(load(v_ref, vs), state(g_ref, ks, vs), trans_b=True)
    dk = _dot(dp, load(q_ref, ks), trans_a=True) + w[:, None] * from_state
    db -= jnp.sum(k_ref[:, ks].astype(jnp.float32) * dk, axis=1)
    dk_ref[:, out] = dk.astype(dk_ref.dtype)
  db_ref[...] = db
  for vs, out, width in own_v:
    from_state = jnp.zeros((chunk, width), jnp.float32)
    for ks, _, _ in all_k:
      from_state += _dot(load(k_ref, ks), state(g_ref, ks, vs))
    dv_ref[:, out] = (_dot(p, load(do_ref, vs), trans_a=True) +
                      w[:, None] * from_state).astype(dv_ref.dtype)


def backward_config(chunk: int, key_dim: int, value_dim: int) -> tuple[int, int]:
  """(num_warps, split) of the backward kernel; split programs share one chunk's columns."""
  del key_dim, value_dim
  return (4 if chunk <= 64 else 8), 1


def _backward(q, k, v, do, b, doc, u, w, states, d_states, *, chunk: int, scale: float,
              interpret: bool, sub: int = _SUB, split: int | None = None, grad_dtype=None):
  """(dq, dk, dv in grad_dtype, default each input's own dtype; db float32 [B, T, H])."""
  bsz, t, h, dk = q.shape
  dv = v.shape[-1]
  n = _check_length(t, chunk)
  warps, default_split = backward_config(chunk, dk, dv)
  split = split or default_split
  split = max(1, min(split, dk // 16, dv // 16))
  bk, bv = dk // split, dv // split
  dtype = _compute_dtype(q, k, v, do)
  token_spec = lambda d: pl.BlockSpec((None, chunk, None, d), lambda j, c, bh: _at(bh, h, c, 0))
  grad_spec = lambda d: pl.BlockSpec((None, chunk, None, d), lambda j, c, bh: _at(bh, h, c, j))
  row_spec = pl.BlockSpec((None, chunk, None), lambda j, c, bh: _at(bh, h, c))
  doc_spec = pl.BlockSpec((None, chunk), lambda j, c, bh: (_batch_head(bh, h)[0], c))
  state_spec = pl.BlockSpec((None, None, None, dk, dv), lambda j, c, bh: _at(bh, h, c, 0, 0))
  # With split > 1 each program sums the decay term over its own share of the K columns.
  db_spec = pl.BlockSpec((None, None, chunk, None), lambda j, c, bh: (j, *_at(bh, h, c)))
  kernel = functools.partial(_backward_kernel, split=split, scale=float(scale), sub=sub,
                             dtype=dtype)
  grad = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype if grad_dtype is None else grad_dtype)
  dq, dk_, dv_, db = pl.pallas_call(
      kernel,
      grid=(split, n, bsz * h),
      in_specs=[token_spec(dk), token_spec(dk), token_spec(dv), token_spec(dv), row_spec,
                doc_spec, row_spec, row_spec, state_spec, state_spec],
      out_specs=[grad_spec(bk), grad_spec(bk), grad_spec(bv), db_spec],
      out_shape=[grad(q), grad(k), grad(v),
                 jax.ShapeDtypeStruct((split, bsz, t, h), jnp.float32)],
      compiler_params=_CompilerParams(num_warps=warps, num_stages=1),
      interpret=interpret,
      name='chunked_scan_backward',
  )(q, k, v, do, b.astype(jnp.float32), doc.astype(jnp.int32), u.astype(jnp.float32),
    w.astype(jnp.float32), states, d_states)
  return dq, dk_, dv_, jnp.sum(db, axis=0) if split > 1 else db[0]


def chunk_backward(q, k, v, do, b, doc, u, w, states, d_states, *, chunk: int, scale: float,
                   interpret: bool = False):
  """(dq, dk, dv in the inputs' dtypes, shaped like q, k, v; db float32 [B, T, H])."""
  return _backward(q, k, v, do, b, doc, u, w, states, d_states, chunk=chunk, scale=scale,
                   interpret=interpret)
