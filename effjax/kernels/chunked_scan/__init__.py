"""Chunked decayed linear attention (GLA, RetNet, linear attention, Mamba-2's SSD): one op.

`chunked_scan(q, k, v, log_decay)` computes, per batch row and head, the recurrence of
reference.py, S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = scale * q_t^T S_t, with resets at
document boundaries (segment_ids), an optional initial state and the final state on request.
q, k [B, T, H, K], v [B, T, H, V], log_decay [B, T, H] (<= 0; one decay per token and head).

Backends: 'triton' (Pallas on GPU, gpu.py), 'mosaic' (Pallas on TPU, tpu.py), 'xla' (the same
chunked steps as plain JAX, chunked.py), 'reference' (the chunked form differentiated by JAX
itself: the specification the others are tested against) and 'auto' (triton on GPU, mosaic on
TPU, xla elsewhere). Every backend but 'reference' runs the four steps of chunked.py under one
custom VJP, so the op is differentiable in q, k, v, log_decay and the initial state, and the
final state may carry a cotangent. Forward-mode differentiation (a Hessian-vector product) needs
backend='reference'.

Memory: the forward pass saves its inputs and the final state; the per-chunk states
([B, T / C, H, K, V] float32) are recomputed in the backward pass rather than kept.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from effjax.kernels.chunked_scan import chunked
from effjax.kernels.chunked_scan.chunked import chunked_reference
from effjax.kernels.chunked_scan.reference import (
  quadratic_reference,
  recurrent_reference,
  recurrent_step,
)

__all__ = [
  'BACKENDS',
  'chunked_reference',
  'chunked_scan',
  'default_chunk',
  'quadratic_reference',
  'recurrent_reference',
  'recurrent_step',
  'resolve_backend',
]

BACKENDS = ('auto', 'triton', 'mosaic', 'xla', 'reference')
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def resolve_backend(backend: str) -> str:
  """'auto' -> 'triton' on GPU, 'mosaic' on TPU, 'xla' elsewhere."""
  if backend not in BACKENDS:
    raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}')
  if backend != 'auto':
    return backend
  return {'gpu': 'triton', 'tpu': 'mosaic'}.get(jax.default_backend(), 'xla')


def _module(backend: str):
  if backend == 'triton':
    from effjax.kernels.chunked_scan import gpu
    return gpu
  if backend == 'mosaic':
    from effjax.kernels.chunked_scan import tpu
    return tpu
  return chunked


def default_chunk(backend: str) -> int:
  """The chunk length a backend runs with unless told otherwise."""
  module = _module(resolve_backend(backend))
  return getattr(module, 'DEFAULT_CHUNK', 64)


@dataclasses.dataclass(frozen=True)
class _Static:
  backend: str
  chunk: int
  scale: float
  interpret: bool


def _pad(x: jax.Array, pad: int, mode: str = 'constant') -> jax.Array:
  if not pad:
    return x
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), mode=mode)


def _forward(q, k, v, g, seg, initial, static: _Static):
  """(o [B, T_padded, H, V], final, chunk weights) through the backend's four-step module."""
  mod, c = _module(static.backend), static.chunk
  cw = chunked.chunk_weights(g, seg, c)
  states, final = mod.chunk_states(k, v, cw.w, cw.carry, initial, chunk=c,
                                   interpret=static.interpret)
  o = mod.chunk_output(q, k, v, cw.b, cw.doc, cw.u, states, chunk=c, scale=static.scale,
                       interpret=static.interpret)
  return o, final, cw, states


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _scan(q, k, v, g, seg, initial, static: _Static):
  o, final, _, _ = _forward(q, k, v, g, seg, initial, static)
  return o, final


def _scan_fwd(q, k, v, g, seg, initial, static: _Static):
  o, final, _, _ = _forward(q, k, v, g, seg, initial, static)
  return (o, final), (q, k, v, g, seg, initial, final)


def _scan_bwd(static: _Static, residuals, cotangents):
  q, k, v, g, seg, initial, final = residuals
  do, d_final = cotangents
  mod, c, kw = _module(static.backend), static.chunk, {'interpret': static.interpret}
  cw = chunked.chunk_weights(g, seg, c)
  states, _ = mod.chunk_states(k, v, cw.w, cw.carry, initial, chunk=c, **kw)  # recomputed
  d_final = d_final.astype(jnp.float32)
  d_states, d_initial = mod.chunk_state_grads(q, do, cw.u, cw.carry, d_final, chunk=c,
                                              scale=static.scale, **kw)
  dq, dk, dv, db = mod.chunk_backward(q, k, v, do, cw.b, cw.doc, cw.u, cw.w, states, d_states,
                                      chunk=c, scale=static.scale, **kw)
  dg = chunked.finish_log_decay_grad(db, states, final, d_states, cw.doc, chunk=c)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg.astype(g.dtype), None,
          d_initial.astype(initial.dtype))


_scan.defvjp(_scan_fwd, _scan_bwd)


def _check(q, k, v, log_decay, segment_ids, initial_state) -> None:
  if q.ndim != 4 or k.shape != q.shape:
    raise ValueError(f'q and k must both be [batch, time, heads, key_dim], got {q.shape} and '
                     f'{k.shape}')
  b, t, h, _ = q.shape
  if v.ndim != 4 or v.shape[:3] != (b, t, h):
    raise ValueError(f'v must be [{b}, {t}, {h}, value_dim] like q, got {v.shape}')
  if log_decay.shape != (b, t, h):
    raise ValueError(f'log_decay must be [{b}, {t}, {h}] (one per token and head), got '
                     f'{log_decay.shape}')
  for name, x in (('q', q), ('k', k), ('v', v), ('log_decay', log_decay)):
    if jnp.dtype(x.dtype) not in DTYPES:
      raise ValueError(f'{name} must be bfloat16, float16 or float32, got {x.dtype}')
  if segment_ids is not None and (segment_ids.shape != (b, t) or
                                  not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
    raise ValueError(f'segment_ids must be integer [{b}, {t}], got {segment_ids.dtype} '
                     f'{segment_ids.shape}')
  want = (b, h, q.shape[3], v.shape[3])
  if initial_state is not None and initial_state.shape != want:
    raise ValueError(f'initial_state must be {list(want)} [batch, heads, key_dim, value_dim], '
                     f'got {initial_state.shape}')


def chunked_scan(q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array, *,
                 segment_ids: jax.Array | None = None, initial_state: jax.Array | None = None,
                 scale: float = 1.0, chunk_size: int | None = None, backend: str = 'auto',
                 interpret: bool = False, return_final_state: bool = False):
  """Decayed linear attention -> o [B, T, H, V] in v's dtype (and the float32 final state).

  Any T: the last chunk is padded. chunk_size defaults per backend (default_chunk);
  interpret=True runs a Pallas backend in interpret mode (CPU tests).
  """
  backend = resolve_backend(backend)
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids)
  _check(q, k, v, log_decay, segment_ids, initial_state)
  chunk = int(chunk_size or default_chunk(backend))
  if chunk < 1:
    raise ValueError(f'chunk_size must be >= 1, got {chunk}')
  module = _module(backend)
  if hasattr(module, 'validate'):
    module.validate(chunk=chunk, key_dim=q.shape[3], value_dim=v.shape[3], dtype=q.dtype)
  b, t, h, dk = q.shape
  if backend == 'reference':
    o, final = chunked_reference(q, k, v, log_decay, segment_ids=segment_ids,
                                 initial_state=initial_state, scale=scale, chunk=chunk)
    o = o.astype(v.dtype)
  else:
    pad = -t % chunk
    seg = None if segment_ids is None else _pad(segment_ids.astype(jnp.int32), pad, 'edge')
    initial = (jnp.zeros((b, h, dk, v.shape[3]), jnp.float32) if initial_state is None
               else initial_state.astype(jnp.float32))
    o, final = _scan(_pad(q, pad), _pad(k, pad), _pad(v, pad), _pad(log_decay, pad), seg,
                     initial, _Static(backend, chunk, float(scale), bool(interpret)))
    o = o[:, :t]
  return (o, final) if return_final_state else o
