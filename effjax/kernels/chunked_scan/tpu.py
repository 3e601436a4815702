"""The four chunked-scan steps of chunked.py as Pallas Mosaic kernels (TPU).

Each function here has the signature and the semantics of its plain-JAX twin in chunked.py; the
weights (b, doc, u, w, carry) arrive precomputed from chunked.chunk_weights. Per batch row and
head the sequence is cut into n = T / C chunks of C tokens (C a multiple of 128).

Kernels:
  scan     grid (B, H, n), chunk axis 'arbitrary'. Serves chunk_states (forward) and
           chunk_state_grads (reverse: the index_maps visit chunk n - 1 - step). The [K, V]
           float32 state lives in VMEM scratch across the chunk axis; each step stores the state
           it was handed (S_c, or G_{c+1}) as that chunk's output block, then applies
           state <- carry_c * state + (x * weight)^T y, a [K, C] x [C, V] matmul. The last step
           stores the final state (or dL/d initial state) into an output block that stays
           resident over the chunk axis and is written back once.
  output   grid (B, H, n), all 'parallel': o = scale * [((q k^T) * D) v + u * (q S_c)].
  backward grid (B, H, n), all 'parallel': dq, dk, dv of one chunk from its S_c and G_{c+1}.

The intra-chunk decay D is built in VMEM from the chunk-local cumulative log-decay b and the
document index doc, as exp(b_i - b_j) where j <= i and doc_i == doc_j (exponent <= 0, so no
overflow), zero elsewhere. The backward kernel works in key-major orientation: it builds D^T
(keys j on sublanes, queries i on lanes), forms (k q^T) * D^T and (v do^T) * D^T with NT
matmuls, so dk and dv are plain [C, C] x [C, D] products; dq needs (do v^T) * D, which is one
[C, C] float32 transpose of the latter (a whole number of 128 x 128 tiles).

Layouts (Mosaic wants each block's last two dims divisible by (8, 128) or equal to the array's):
  - token tiles move to head-major [B, H, T, D] (flash_attention/tpu.py does the same), so a
    block is (C, D) with D the full head dim: 64 would not be a legal lane slice of H * D.
  - the scan's contracted operand (k forward, q backward) moves to [B, H, D, T] instead, so the
    [D, C] block times the [C, V] block is an NN matmul: the token axis is contracted without an
    in-kernel transpose of a (C, D) tile, which for D = 64 is not lane-aligned. The per-token
    weight then multiplies it as a [1, C] row, broadcast along sublanes.
  - per-token float32 weights [B, T, H] travel as rows [B, H, 1, T], doc int32 [B, T] as
    [B, 1, T]; kernels that need a column turn the [1, C] row into [C, 1] in VMEM.
  - the chunk carries [B, n, H] travel as one row [B, H, 1, n] per head, fetched once for the
    whole chunk axis; a step picks its carry with a lane mask and a lane sum (no dynamic lane
    indexing, no SMEM table that grows with the sequence).
  - chunk states stay [B, n, H, K, V]; a block is one full [K, V] state.

Precision: accumulation is float32 everywhere. Matmul operands are the input dtype: bf16 tiles
feed the MXU directly, and float32 intermediates (the decay-masked scores, the states) are cast to
bf16 right before their dot; float32 inputs use Precision.HIGHEST. Elementwise work is float32
(v4 / v5e have no bf16 VPU). float16 inputs are cast to float32 by XLA before the kernels: TPUs
have no float16 MXU path, and float32 keeps float16's mantissa.

Unmeasured: none of this has run on a TPU. It is verified in TPU interpret mode on CPU and its
Mosaic lowering is checked from CPU (tests/kernels/test_chunked_scan_tpu.py); libtpu's own
compilation (vector layouts, VMEM fit), speed and the choice C = 128 are untested. The XLA
transposes into the two layouts above cost HBM passes a fused in-kernel transpose might avoid.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from effjax.kernels.chunked_scan import chunked

LANES = 128
DEFAULT_CHUNK = 128
MAX_HEAD_DIM = 512
# Rough per-step VMEM budget (the default scoped VMEM limit is 16 MiB on v4 / v5e); the estimate
# in _vmem_bytes counts double-buffered blocks and the big in-kernel temporaries.
_VMEM_BUDGET = 14 * 2 ** 20
_NT = (((1,), (1,)), ((), ()))  # a [m, d] x b [n, d] -> [m, n]
_NN = (((1,), (0,)), ((), ()))  # a [m, k] x b [k, n] -> [m, n]
_KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def _vmem_bytes(chunk: int, key_dim: int, value_dim: int, itemsize: int) -> int:
  """Estimated VMEM of the largest kernel (backward): blocks twice, temporaries once."""
  c, dk, dv = chunk, key_dim, value_dim
  inputs = 2 * (2 * c * dk + 2 * c * dv) * itemsize + 2 * 2 * dk * dv * 4
  outputs = 2 * (2 * c * dk + c * dv) * 4
  temporaries = 6 * c * c * 4 + 3 * (c * dk + c * dv) * 4
  return inputs + outputs + temporaries


def validate(*, chunk: int, key_dim: int, value_dim: int, dtype) -> None:
  """Raises ValueError naming the first Mosaic constraint the configuration violates."""
  if chunk % LANES:
    raise ValueError(f"chunk_size={chunk} must be a multiple of {LANES} for backend='mosaic'; "
                     f"use chunk_size={DEFAULT_CHUNK} or backend='xla'")
  # Head dims are whole blocks (any size is a legal block); multiples of 16 keep the [D, C] bf16
  # tiles and the [K, V] states in whole packed sublane tiles, and 512 bounds the state in VMEM.
  for name, dim in (('key_dim', key_dim), ('value_dim', value_dim)):
    if dim % 16 or dim > MAX_HEAD_DIM:
      raise ValueError(f"{name}={dim} must be a multiple of 16 and at most {MAX_HEAD_DIM} for "
                       f"backend='mosaic'; use backend='xla'")
  dt = jnp.dtype(dtype)
  if dt not in (*_KERNEL_DTYPES, jnp.dtype(jnp.float16)):
    raise ValueError(f"dtype={dt} is not supported by backend='mosaic' (bfloat16, float16 or "
                     f"float32); use backend='xla'")
  need = _vmem_bytes(chunk, key_dim, value_dim, 2 if dt == jnp.bfloat16 else 4)
  if need > _VMEM_BUDGET:
    raise ValueError(f"chunk_size={chunk} with key_dim={key_dim}, value_dim={value_dim} needs "
                     f"about {need / 2 ** 20:.1f} MiB of VMEM per step (budget "
                     f"{_VMEM_BUDGET / 2 ** 20:.0f} MiB) for backend='mosaic'; use a smaller "
                     f"chunk_size or backend='xla'")


# ----------------------------------------------------------------------------- helpers


def _interpret(interpret: bool):
  return pltpu.InterpretParams() if interpret else False


def _kernel_dtype(*xs) -> jnp.dtype:
  """The dtype tiles reach the kernels in: float16 (and mixed inputs) widen to float32."""
  dt = jnp.dtype(jnp.result_type(*xs))
  return dt if dt in _KERNEL_DTYPES else jnp.dtype(jnp.float32)


def _heads_major(x_btd, dtype):
  """[B, T, H, D] -> [B, H, T, D]."""
  return jnp.swapaxes(x_btd, 1, 2).astype(dtype)


def _heads_major_t(x_btd, dtype):
  """[B, T, H, D] -> [B, H, D, T]: the token axis on lanes, for contracting it with an NN dot."""
  return jnp.transpose(x_btd, (0, 2, 3, 1)).astype(dtype)


def _rows(x_bth):
  """float32 [B, T, H] -> rows [B, H, 1, T]."""
  return jnp.swapaxes(x_bth.astype(jnp.float32), 1, 2)[:, :, None, :]


def _column(row_ref) -> jax.Array:
  """A [1, n] row block as an [n, 1] column value."""
  return jnp.expand_dims(row_ref[0], -1)


def _dot(a, b, dims):
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _decay(b_ref, doc_ref, *, key_major: bool) -> jax.Array:
  """float32 [C, C] intra-chunk decay: D (queries on sublanes) or D^T (keys on sublanes)."""
  b_row, b_col = b_ref[...], _column(b_ref)
  same_doc = _column(doc_ref) == doc_ref[...]
  shape = (b_row.shape[1], b_row.shape[1])
  sub = lax.broadcasted_iota(jnp.int32, shape, 0)
  lane = lax.broadcasted_iota(jnp.int32, shape, 1)
  if key_major:  # [j, i]: exp(b_i - b_j) for i >= j
    allowed, diff = same_doc & (sub <= lane), b_row - b_col
  else:  # [i, j]: exp(b_i - b_j) for j <= i
    allowed, diff = same_doc & (lane <= sub), b_col - b_row
  # The inner where keeps masked exponents (which may be positive) from overflowing to inf.
  return jnp.where(allowed, jnp.exp(jnp.where(allowed, diff, 0.0)), 0.0)


def _check_length(t: int, chunk: int) -> None:
  if chunk % LANES or t % chunk:
    raise ValueError(f'mosaic chunked scan needs T={t} to be a multiple of the chunk ({chunk}), '
                     f'itself a multiple of {LANES}')


def _parallel(last: str):
  return pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel', last))


# ----------------------------------------------------------------------------- scan over chunks


def _scan_kernel(xt_ref, y_ref, weight_ref, carry_ref, start_ref, emit_ref, last_ref, state_sc,
                 *, num_chunks: int, reverse: bool):
  step = pl.program_id(2)
  chunk = num_chunks - 1 - step if reverse else step

  @pl.when(step == 0)
  def _init():
    state_sc[...] = start_ref[...]

  state = state_sc[...]
  emit_ref[...] = state  # the state entering this step: S_c, or G_{c+1} in reverse
  y = y_ref[...]
  # The weight sits on the contracted token axis, so it must scale an operand, not the product.
  xw = (xt_ref[...].astype(jnp.float32) * weight_ref[...]).astype(y.dtype)  # [D, C] * [1, C]
  local = _dot(xw, y, _NN)  # [K, V]
  lane = lax.broadcasted_iota(jnp.int32, carry_ref.shape, 1)
  carry = jnp.sum(jnp.where(lane == chunk, carry_ref[...], 0.0), axis=1, keepdims=True)  # [1, 1]
  state = carry * state + local
  state_sc[...] = state

  @pl.when(step == num_chunks - 1)
  def _finish():
    last_ref[...] = state


def _scan_call(x, y, weight, carry, start, *, chunk: int, reverse: bool, interpret: bool,
               name: str):
  """Emitted states [B, n, H, K, V] and the last state [B, H, K, V] (float32) of
  state <- carry_c * state + (weight_c * x_c)^T y_c over the chunks (reverse: last chunk first)."""
  bsz, t, h, dk = x.shape
  dv = y.shape[-1]
  _check_length(t, chunk)
  n = t // chunk
  dtype = _kernel_dtype(x, y)

  def at(c):
    return n - 1 - c if reverse else c

  xt_spec = pl.BlockSpec((None, None, dk, chunk), lambda b, hh, c: (b, hh, 0, at(c)))
  y_spec = pl.BlockSpec((None, None, chunk, dv), lambda b, hh, c: (b, hh, at(c), 0))
  row_spec = pl.BlockSpec((None, None, 1, chunk), lambda b, hh, c: (b, hh, 0, at(c)))
  carry_spec = pl.BlockSpec((None, None, 1, n), lambda b, hh, c: (b, hh, 0, 0))
  state_spec = pl.BlockSpec((None, None, dk, dv), lambda b, hh, c: (b, hh, 0, 0))
  emit_spec = pl.BlockSpec((None, None, None, dk, dv), lambda b, hh, c: (b, at(c), hh, 0, 0))
  itemsize = jnp.dtype(dtype).itemsize
  cost = pl.CostEstimate(
      flops=2 * bsz * h * t * dk * dv, transcendentals=0,
      bytes_accessed=bsz * h * (t * (dk + dv) * itemsize + 4 * t + (n + 2) * dk * dv * 4))
  emitted, last = pl.pallas_call(
      functools.partial(_scan_kernel, num_chunks=n, reverse=reverse),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0, grid=(bsz, h, n),
          in_specs=[xt_spec, y_spec, row_spec, carry_spec, state_spec],
          out_specs=[emit_spec, state_spec],
          scratch_shapes=[pltpu.VMEM((dk, dv), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((bsz, n, h, dk, dv), jnp.float32),
                 jax.ShapeDtypeStruct((bsz, h, dk, dv), jnp.float32)],
      compiler_params=_parallel('arbitrary'), interpret=_interpret(interpret),
      cost_estimate=cost, name=name,
  )(_heads_major_t(x, dtype), _heads_major(y, dtype), _rows(weight), _rows(carry),
    start.astype(jnp.float32))
  return emitted, last


def chunk_states(k, v, w, carry, initial, *, chunk: int, interpret: bool = False):
  """(states entering each chunk [B, n, H, K, V], final state [B, H, K, V]), float32."""
  return _scan_call(k, v, w, carry, initial, chunk=chunk, reverse=False, interpret=interpret,
                    name='chunk_states')


def chunk_state_grads(q, do, u, carry, d_final, *, chunk: int, scale: float,
                      interpret: bool = False):
  """(G_{c+1} = dL/d(state leaving chunk c) [B, n, H, K, V], dL/d(initial state)), float32."""
  # scale folds into the per-token weight: one [B, T, H] multiply in XLA, none in the kernel.
  return _scan_call(q, do, u.astype(jnp.float32) * scale, carry, d_final, chunk=chunk,
                    reverse=True, interpret=interpret, name='chunk_state_grads')


# ----------------------------------------------------------------------------- per-chunk steps


def _chunk_specs(chunk: int, dk: int, dv: int):
  """BlockSpecs on grid (b, h, c) for the independent per-chunk kernels."""
  def tile(d):
    return pl.BlockSpec((None, None, chunk, d), lambda b, h, c: (b, h, c, 0))
  return dict(
      k_tile=tile(dk), v_tile=tile(dv),
      row=pl.BlockSpec((None, None, 1, chunk), lambda b, h, c: (b, h, 0, c)),
      doc=pl.BlockSpec((None, 1, chunk), lambda b, h, c: (b, 0, c)),
      state=pl.BlockSpec((None, None, None, dk, dv), lambda b, h, c: (b, c, h, 0, 0)))


def _output_kernel(q_ref, k_ref, v_ref, b_ref, doc_ref, u_ref, s_ref, o_ref, *, scale: float):
  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  scores = _dot(q, k, _NT) * _decay(b_ref, doc_ref, key_major=False)  # [i, j]
  intra = _dot(scores.astype(v.dtype), v, _NN)
  # u scales rows after the dot: the same product, one fewer pass over the q tile.
  inter = _column(u_ref) * _dot(q, s_ref[...].astype(q.dtype), _NN)
  o_ref[...] = (scale * (intra + inter)).astype(o_ref.dtype)


def chunk_output(q, k, v, b, doc, u, states, *, chunk: int, scale: float,
                 interpret: bool = False):
  """o [B, T, H, V] in v's dtype."""
  bsz, t, h, dk = q.shape
  dv = v.shape[-1]
  _check_length(t, chunk)
  n = t // chunk
  dtype = _kernel_dtype(q, k, v)
  out_dtype = v.dtype if jnp.dtype(v.dtype) in _KERNEL_DTYPES else jnp.float32
  specs = _chunk_specs(chunk, dk, dv)
  itemsize = jnp.dtype(dtype).itemsize
  cost = pl.CostEstimate(
      flops=2 * bsz * h * t * (chunk * (dk + dv) + dk * dv),
      transcendentals=bsz * h * t * chunk,
      bytes_accessed=bsz * h * (t * (2 * dk + 2 * dv) * itemsize + 12 * t + n * dk * dv * 4))
  o_bhtv = pl.pallas_call(
      functools.partial(_output_kernel, scale=float(scale)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0, grid=(bsz, h, n),
          in_specs=[specs['k_tile'], specs['k_tile'], specs['v_tile'], specs['row'],
                    specs['doc'], specs['row'], specs['state']],
          out_specs=specs['v_tile']),
      out_shape=jax.ShapeDtypeStruct((bsz, h, t, dv), out_dtype),
      compiler_params=_parallel('parallel'), interpret=_interpret(interpret),
      cost_estimate=cost, name='chunk_output',
  )(_heads_major(q, dtype), _heads_major(k, dtype), _heads_major(v, dtype), _rows(b),
    doc.astype(jnp.int32)[:, None, :], _rows(u), states.astype(jnp.float32))
  return jnp.swapaxes(o_bhtv, 1, 2).astype(v.dtype)


def _backward_kernel(q_ref, k_ref, v_ref, do_ref, b_ref, doc_ref, u_ref, w_ref, s_ref, g_ref,
                     dq_ref, dk_ref, dv_ref, *, scale: float):
  q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
  dtype = q.dtype
  decay_t = _decay(b_ref, doc_ref, key_major=True)  # [j, i]
  p_t = _dot(k, q, _NT) * decay_t  # ((q k^T) * D)^T
  dp_t = _dot(v, do, _NT) * decay_t  # ((do v^T) * D)^T
  s, g = s_ref[...].astype(dtype), g_ref[...].astype(dtype)
  w = _column(w_ref)
  dv_ref[...] = scale * _dot(p_t.astype(dtype), do, _NN) + w * _dot(k, g, _NN)
  dk_ref[...] = scale * _dot(dp_t.astype(dtype), q, _NN) + w * _dot(v, g, _NT)
  dq_ref[...] = scale * (_dot(dp_t.T.astype(dtype), k, _NN) +
                         _column(u_ref) * _dot(do, s, _NT))


def chunk_backward(q, k, v, do, b, doc, u, w, states, d_states, *, chunk: int, scale: float,
                   interpret: bool = False):
  """(dq, dk, dv float32, shaped like q, k, v; db float32 [B, T, H]), as chunked.chunk_backward."""
  bsz, t, h, dk = q.shape
  dv = v.shape[-1]
  _check_length(t, chunk)
  n = t // chunk
  dtype = _kernel_dtype(q, k, v, do)
  specs = _chunk_specs(chunk, dk, dv)
  itemsize = jnp.dtype(dtype).itemsize
  cost = pl.CostEstimate(
      flops=2 * bsz * h * t * (chunk * (3 * dk + 3 * dv) + 3 * dk * dv),
      transcendentals=bsz * h * t * chunk,
      bytes_accessed=bsz * h * (t * (2 * dk + 2 * dv) * (itemsize + 4) + 20 * t +
                                2 * n * dk * dv * 4))
  dq, dk_, dv_ = pl.pallas_call(
      functools.partial(_backward_kernel, scale=float(scale)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0, grid=(bsz, h, n),
          in_specs=[specs['k_tile'], specs['k_tile'], specs['v_tile'], specs['v_tile'],
                    specs['row'], specs['doc'], specs['row'], specs['row'], specs['state'],
                    specs['state']],
          out_specs=[specs['k_tile'], specs['k_tile'], specs['v_tile']]),
      out_shape=[jax.ShapeDtypeStruct((bsz, h, t, dk), jnp.float32),
                 jax.ShapeDtypeStruct((bsz, h, t, dk), jnp.float32),
                 jax.ShapeDtypeStruct((bsz, h, t, dv), jnp.float32)],
      compiler_params=_parallel('parallel'), interpret=_interpret(interpret),
      cost_estimate=cost, name='chunk_backward',
  )(_heads_major(q, dtype), _heads_major(k, dtype), _heads_major(v, dtype),
    _heads_major(do, dtype), _rows(b), doc.astype(jnp.int32)[:, None, :], _rows(u), _rows(w),
    states.astype(jnp.float32), d_states.astype(jnp.float32))
  dq, dk_, dv_ = (jnp.swapaxes(x, 1, 2) for x in (dq, dk_, dv_))
  # The float32 gradients are already in HBM here, so the per-token decay term is an XLA fusion.
  return dq, dk_, dv_, chunked.decay_term(q, k, dq, dk_)
