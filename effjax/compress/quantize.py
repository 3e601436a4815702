"""Quantization mechanics: qwix's quantize / dequantize / einsum, applied to effjax weight layouts.

qwix (Google's JAX quantization library) does the numerics: absmax scales per channel or per
tile, rounding and clipping into int8 / int4 / float8_e4m3fn, dequantization, and an einsum that
multiplies two quantized operands in their integer type and applies the scales to the result.
What it leaves to the caller, and this module adds, is which axes are channels and groups for
each effjax weight (`Layout`: per output channel, per layer; int4 groups along the last input
axis), static activation scales calibrated on held-out batches for W8A8, and the
straight-through fake quantization used in quantization-aware training. qwix's own model
rewriting (`qwix.quantize_model`) is not used: it intercepts calls inside a module's `__call__`,
while effjax's layer scan re-creates the modules from their state at every step and decoding
runs other methods (prefill, decode); swapping the weights themselves works for all of them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import qwix

# pack_int4's inverse, shared with the quantized-matmul kernel's reference (one layout, one
# unpacker).
from effjax.kernels.quantized_matmul.reference import unpack_int4

QTYPES = {'int8': jnp.int8, 'w8a8': jnp.int8, 'fp8': jnp.float8_e4m3fn, 'int4': jnp.int4}
INT8_MAX = 127.0


def _how(layout, ndim: int, kind: str, group: int, shape) -> dict:
  """qwix's channelwise / tiled axes for a weight: channels = batch + output axes."""
  channels = layout.axes('batch', ndim) + layout.axes('outputs', ndim)
  how = {'channelwise_axes': channels}
  if kind == 'int4':  # a group is `group` consecutive entries of the last input axis
    how['channelwise_axes'] = channels + layout.axes('inputs', ndim)[:-1]
    last_input = layout.axes('inputs', ndim)[-1]
    size = shape[last_input]
    g = min(group, size)
    if size % g:
      raise ValueError(f'compress.int4_group_size={group}: must divide the input axis of size '
                       f'{size} (layout {layout.names})')
    how['tiled_axes'] = {last_input: g}
  return how


@functools.partial(jax.jit, static_argnames=('layout', 'kind', 'group'))
def quantize_weight(w: jax.Array, layout, kind: str, group: int = 128):
  """(qvalue, float32 scale) of w: per output channel and layer; int4 in groups along the input.

  One compiled program per weight shape and layout (the weights of a model share a few), not a
  dispatch and a compile per primitive.

  int4 values are stored two to a byte (uint8) along the last input axis, which halves, and
  float8 as its uint8 bit pattern: plain uint8 arrays go through the optimizer's arithmetic,
  the checkpoint and the mesh like any other, and int4 decoding reads half the bytes of int8.
  """
  how = _how(layout, w.ndim, kind, group, w.shape)
  qarr = qwix.quantize(w.astype(jnp.float32), QTYPES[kind], **how)
  qvalue = qarr.qvalue
  if kind == 'int4':
    qvalue = pack_int4(qvalue, layout.axes('inputs', w.ndim)[-1])
  elif kind == 'fp8':  # kept as its bit pattern: float8 has no implicit promotion in arithmetic
    qvalue = jax.lax.bitcast_convert_type(qvalue, jnp.uint8)
  return qvalue, qarr.scale.astype(jnp.float32)


def pack_int4(q: jax.Array, axis: int) -> jax.Array:
  """int4 values -> uint8, entries 2i (low nibble) and 2i + 1 (high nibble) of `axis` per byte."""
  if q.shape[axis] % 2:
    raise ValueError(f'int4 packing needs an even axis, got {q.shape[axis]}')
  nibbles = (q.astype(jnp.int8) & 0xF).astype(jnp.uint8)
  pairs = nibbles.reshape(q.shape[:axis] + (q.shape[axis] // 2, 2) + q.shape[axis + 1:])
  low, high = jnp.take(pairs, 0, axis=axis + 1), jnp.take(pairs, 1, axis=axis + 1)
  return low | (high << 4)


def as_qarray(qvalue: jax.Array, scale: jax.Array, kind: str, layout=None) -> qwix.QArray:
  """A qwix QArray of stored values (int4: unpacked to int8 values, int4's logical range)."""
  if kind == 'int4':
    qvalue = unpack_int4(qvalue, layout.axes('inputs', qvalue.ndim)[-1])
    return qwix.QArray(qvalue, scale, None, jnp.int8)
  if kind == 'fp8':
    qvalue = jax.lax.bitcast_convert_type(qvalue, jnp.float8_e4m3fn)
  return qwix.QArray(qvalue, scale, None, QTYPES[kind])


def dequantize(qarr: qwix.QArray) -> jax.Array:
  return qwix.dequantize(qarr)


def einsum(equation: str, lhs, rhs) -> jax.Array:
  """qwix's einsum: float x quantized dequantizes the weight inside the jitted product; quantized x
  quantized multiplies the integers (int32 accumulation) and scales the result."""
  return qwix.einsum(equation, lhs, rhs)


def static_scale(amax: jax.Array) -> jax.Array:
  """The int8 scale of an activation whose calibrated max|x| is amax (never 0)."""
  return jnp.maximum(jnp.asarray(amax, jnp.float32), 1e-8) / INT8_MAX


def quantize_static(x: jax.Array, scale: jax.Array) -> qwix.QArray:
  """x -> int8 with one fixed (calibrated) scale; values beyond the calibrated range clip."""
  s = scale.astype(jnp.float32).reshape((1,) * x.ndim)
  qvalue = jnp.clip(jnp.round(x.astype(jnp.float32) / s), -INT8_MAX, INT8_MAX).astype(jnp.int8)
  return qwix.QArray(qvalue, s.astype(x.dtype), None, jnp.int8)


def w8a8_einsum(equation: str, x: jax.Array, act_scale: jax.Array, qvalue: jax.Array,
                scale: jax.Array, layout) -> jax.Array:
  """x quantized to int8 with its calibrated static scale times int8 weights (an int8 x int8
  product with int32 accumulation). The gradient to x passes straight through the rounding
  (zero where x was clipped to the calibrated range) and through the dequantized weight, so
  W8A8 models fine-tune (LoRA on them, or training the unquantized parameters around them);
  the weights and scales themselves take no gradient."""
  return _w8a8(equation, layout, x, act_scale, qvalue, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _w8a8(equation, layout, x, act_scale, qvalue, scale):
  xq = quantize_static(x, act_scale)
  return qwix.einsum(equation, xq, as_qarray(qvalue, scale.astype(jnp.float32), 'w8a8', layout))


def _w8a8_fwd(equation, layout, x, act_scale, qvalue, scale):
  return _w8a8(equation, layout, x, act_scale, qvalue, scale), (x, act_scale, qvalue, scale)


def _w8a8_bwd(equation, layout, residuals, g):
  x, act_scale, qvalue, scale = residuals
  w = dequantize(as_qarray(qvalue, scale.astype(jnp.float32), 'w8a8', layout))
  x32 = x.astype(jnp.float32)
  _, pullback = jax.vjp(lambda x: jnp.einsum(equation, x, w), x32)
  (dx,) = pullback(g.astype(jnp.float32))
  limit = INT8_MAX * act_scale.astype(jnp.float32).reshape(())
  dx = jnp.where(jnp.abs(x32) <= limit, dx, 0.0)
  return (dx.astype(x.dtype), jnp.zeros_like(act_scale),
          np.zeros(qvalue.shape, jax.dtypes.float0), jnp.zeros_like(scale))


_w8a8.defvjp(_w8a8_fwd, _w8a8_bwd)


@jax.custom_vjp
def _straight_through(w: jax.Array, w_quantized: jax.Array) -> jax.Array:
  return w_quantized


def _st_fwd(w, w_quantized):
  return w_quantized, None


def _st_bwd(_, g):
  return g, None  # the identity's gradient to w; nothing to the quantized copy


_straight_through.defvjp(_st_fwd, _st_bwd)


def fake_quant(w: jax.Array, layout, kind: str, group: int = 128) -> jax.Array:
  """quantize-then-dequantize(w) in w's dtype, with the straight-through gradient (identity)."""
  how = _how(layout, w.ndim, kind, group, w.shape)
  w_q = qwix.dequantize(qwix.quantize(jax.lax.stop_gradient(w).astype(jnp.float32),
                                      QTYPES[kind], **how))
  return _straight_through(w, w_q.astype(w.dtype))


def bits(dtype) -> int:
  """Storage bits of one element (int4 counts 4)."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.dtype(jnp.bool_):
    return 8
  if jnp.issubdtype(dtype, jnp.integer):
    return jnp.iinfo(dtype).bits
  return jnp.finfo(dtype).bits
