"""The chunked form of the scan (reference.py): the decomposition every backend computes.

The sequence is cut into chunks of C tokens (the caller pads T to a multiple of C with g = 0,
k = v = 0, which changes neither outputs nor the final state). Within chunk c, with
b_t = g_{cC} + ... + g_t the chunk-local cumulative log-decay and doc_t the document index of
token t (a running count of resets, so packed ids need not be monotonic):

  intra-chunk pairs  D_ij = exp(b_i - b_j) [j <= i] [doc_i == doc_j]          (exponent <= 0)
  state in           u_t = exp(b_t) [doc_t == doc of the token before the chunk]
  state out          w_t = exp(b_last - b_t) [doc_t == doc_last]
  carry              carry_c = exp(b_last) [doc_last == doc of the token before the chunk]

and the four steps, three of them independent per chunk and one a scan over chunks:

  chunk_states   S_{c+1} = carry_c S_c + (w_c * k_c)^T v_c   (S_0 = initial state; emits S_c)
  chunk_output   o_c = scale * [ ((q_c k_c^T) * D_c) v_c + u_c * (q_c S_c) ]

The backward pass reuses the same shapes. With G_c = dL/dS_c (G_n = the final state's cotangent):

  chunk_state_grads  G_c = carry_c G_{c+1} + scale * (u_c * q_c)^T do_c   (emits G_{c+1})
  chunk_backward     dq = scale * [ ((do v^T) * D) k + u * (do S_c^T) ]
                     dk = scale * ((do v^T) * D)^T q + w * (v G_{c+1}^T)
                     dv = scale * ((q k^T) * D)^T do + w * (k G_{c+1})
                     db = q . dq - k . dk  (per token and head, from the float32 values)

and the log-decays' gradient needs no kernel of its own. Every output depends on g only through
differences B_i - B_j of the cumulative decay B (pairs i >= j), so dL/dB_t = q_t . dq_t -
k_t . dk_t (plus <G_n, S_n> at the last token when the final state has a cotangent) and
dL/dg_s = sum_{t >= s} dL/dB_t. Summed chunk by chunk, every pair that crosses
chunk c's end passes through the state leaving it, and what they contribute to each g_s of the
chunk is one number, <G_{c+1}, S_{c+1}> (with G_n, S_n the final state's cotangent and value):

  dL/dg_s = sum_{t >= s, t in chunk c} (q_t . dq_t - k_t . dk_t) + <G_{c+1}, S_{c+1}>

(finish_log_decay_grad). It uses the inputs themselves and float32 gradients, and sums at most
C terms, so it stays accurate with bf16 inputs over any sequence length; a global reverse sum
over the whole sequence (or the do . o - v . dv form, which reads the rounded output) would let
rounding errors accumulate with T.

The functions below are the plain-JAX versions of the four steps (backend 'xla'); the Pallas
modules (gpu.py, tpu.py) implement the same four functions with the same signatures. Layouts:
token arrays as the model holds them, [B, T, H, K] / [B, T, H, V]; per-token weights float32
[B, T, H]; doc int32 [B, T]; chunk states float32 [B, T / C, H, K, V].

Sequence parallelism. Only chunk_states and chunk_state_grads carry anything from chunk to chunk,
and what they carry is a linear map, S -> carry * S + L. A shard of the sequence on another
device can run all four steps with initial state 0, report its final state F and its total carry
P (the product of its chunks' carries), and an exclusive scan of the pairs (P, F) over the
sequence axis (a log-depth all-gather or ppermute ladder of [B, H, K, V] states) gives each
shard its true incoming state S_in. The shard's output then gains scale * exp(B_t) [doc_t ==
doc_0] q_t S_in (the initial-state term of chunk_output with the shard-global cumulative decay),
which is what passing S_in as `initial_state` computes. The backward pass mirrors it with the
cotangents flowing the other way. No step needs more than its own chunk and one state.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from effjax.kernels.chunked_scan.reference import resets

_HIGHEST = jax.lax.Precision.HIGHEST


class ChunkWeights(NamedTuple):
  """The decay and document weights of one padded sequence, see the module docstring."""
  b: jax.Array  # float32 [B, T, H]: chunk-local cumulative log-decay
  doc: jax.Array  # int32 [B, T]: document index
  u: jax.Array  # float32 [B, T, H]
  w: jax.Array  # float32 [B, T, H]
  carry: jax.Array  # float32 [B, n, H]


def chunk_weights(log_decay_bth: jax.Array, segment_ids_bt: jax.Array | None,
                  chunk: int) -> ChunkWeights:
  """The weights for T = n * chunk tokens (T already padded)."""
  bsz, t, h = log_decay_bth.shape
  n = t // chunk
  b = jnp.cumsum(log_decay_bth.astype(jnp.float32).reshape(bsz, n, chunk, h), axis=2)
  doc = jnp.cumsum(resets(segment_ids_bt, bsz, t).astype(jnp.int32), axis=1)
  doc_c = doc.reshape(bsz, n, chunk)
  doc_last = doc_c[:, :, -1]
  doc_before = jnp.concatenate([doc_c[:, :1, 0], doc_last[:, :-1]], axis=1)  # chunk 0: doc 0
  b_last = b[:, :, -1:, :]
  u = jnp.exp(b) * (doc_c == doc_before[..., None])[..., None]
  w = jnp.exp(b_last - b) * (doc_c == doc_last[..., None])[..., None]
  carry = jnp.exp(b_last[:, :, 0]) * (doc_last == doc_before)[..., None]
  return ChunkWeights(b.reshape(bsz, t, h), doc, u.reshape(bsz, t, h), w.reshape(bsz, t, h),
                      carry)


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
  """[B, T, ...] -> [B, n, C, ...]."""
  return x.reshape(x.shape[0], x.shape[1] // chunk, chunk, *x.shape[2:])


def intra_decay(b_bth: jax.Array, doc_bt: jax.Array, chunk: int) -> jax.Array:
  """D float32 [B, n, H, C, C] (query i, key j) of every chunk."""
  b = _chunks(b_bth, chunk).transpose(0, 1, 3, 2)  # [B, n, H, C]
  doc = _chunks(doc_bt, chunk)  # [B, n, C]
  allowed = (jnp.tril(jnp.ones((chunk, chunk), bool)) &
             (doc[..., :, None] == doc[..., None, :]))[:, :, None]
  diff = jnp.where(allowed, b[..., :, None] - b[..., None, :], 0.0)
  return jnp.where(allowed, jnp.exp(diff), 0.0)


def _f32(x):
  return x.astype(jnp.float32)


def chunk_states(k, v, w, carry, initial, *, chunk: int, interpret: bool = False):
  """(states entering each chunk [B, n, H, K, V], final state [B, H, K, V]), float32."""
  del interpret
  local = jnp.einsum('bnchk,bnchv->bnhkv', _chunks(_f32(k) * w[..., None], chunk),
                     _chunks(_f32(v), chunk), precision=_HIGHEST)
  return _scan(local, carry, initial, reverse=False)


def chunk_state_grads(q, do, u, carry, d_final, *, chunk: int, scale: float,
                      interpret: bool = False):
  """(G_{c+1} = dL/d(state leaving chunk c) [B, n, H, K, V], dL/d(initial state)), float32."""
  del interpret
  local = scale * jnp.einsum('bnchk,bnchv->bnhkv', _chunks(_f32(q) * u[..., None], chunk),
                             _chunks(_f32(do), chunk), precision=_HIGHEST)
  return _scan(local, carry, d_final, reverse=True)


def _scan(local_bnhkv, carry_bnh, start_bhkv, *, reverse: bool):
  """Forward: emits S_c then S_{c+1} = carry_c S_c + L_c. Reverse: emits G_{c+1}, then
  G_c = carry_c G_{c+1} + L_c. Returns (emitted [B, n, H, K, V], the last carry state)."""
  def step(state, xs):
    local, carry = xs
    return carry[..., None, None] * state + local, state

  xs = (jnp.moveaxis(local_bnhkv, 1, 0), jnp.moveaxis(carry_bnh, 1, 0))
  last, emitted = jax.lax.scan(step, start_bhkv, xs, reverse=reverse)
  return jnp.moveaxis(emitted, 0, 1), last


def chunk_output(q, k, v, b, doc, u, states, *, chunk: int, scale: float,
                 interpret: bool = False):
  """o [B, T, H, V] in v's dtype."""
  del interpret
  d = intra_decay(b, doc, chunk)
  qc, kc, vc = (_chunks(_f32(x), chunk) for x in (q, k, v))
  scores = jnp.einsum('bnihk,bnjhk->bnhij', qc, kc, precision=_HIGHEST) * d
  intra = jnp.einsum('bnhij,bnjhv->bnihv', scores, vc, precision=_HIGHEST)
  inter = jnp.einsum('bnihk,bnhkv->bnihv', qc * _chunks(u, chunk)[..., None], states,
                     precision=_HIGHEST)
  o = scale * (intra + inter)
  return o.reshape(v.shape).astype(v.dtype)


def chunk_backward(q, k, v, do, b, doc, u, w, states, d_states, *, chunk: int, scale: float,
                   interpret: bool = False):
  """(dq, dk, dv shaped like q, k, v; db float32 [B, T, H] = q . dq - k . dk).

  The gradients may come in float32 or in the inputs' dtype (a backend's choice: the op casts
  them to the inputs' dtypes); db is always formed from the float32 values, before any rounding,
  so the log-decay gradient (finish_log_decay_grad) keeps float32 accuracy.
  """
  del interpret
  d = intra_decay(b, doc, chunk)
  qc, kc, vc, doc_ = (_chunks(_f32(x), chunk) for x in (q, k, v, do))
  uc, wc = _chunks(u, chunk)[..., None], _chunks(w, chunk)[..., None]
  dp = jnp.einsum('bnihv,bnjhv->bnhij', doc_, vc, precision=_HIGHEST) * d  # (do v^T) * D
  p = jnp.einsum('bnihk,bnjhk->bnhij', qc, kc, precision=_HIGHEST) * d  # (q k^T) * D
  dq = scale * (jnp.einsum('bnhij,bnjhk->bnihk', dp, kc, precision=_HIGHEST) +
                uc * jnp.einsum('bnihv,bnhkv->bnihk', doc_, states, precision=_HIGHEST))
  dk = (scale * jnp.einsum('bnhij,bnihk->bnjhk', dp, qc, precision=_HIGHEST) +
        wc * jnp.einsum('bnjhv,bnhkv->bnjhk', vc, d_states, precision=_HIGHEST))
  dv = (scale * jnp.einsum('bnhij,bnihv->bnjhv', p, doc_, precision=_HIGHEST) +
        wc * jnp.einsum('bnjhk,bnhkv->bnjhv', kc, d_states, precision=_HIGHEST))
  dq, dk, dv = dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)
  return dq, dk, dv, decay_term(q, k, dq, dk)


def decay_term(q, k, dq, dk) -> jax.Array:
  """db float32 [B, T, H] = q . dq - k . dk, from float32 gradients."""
  return jnp.sum(_f32(q) * _f32(dq), axis=-1) - jnp.sum(_f32(k) * _f32(dk), axis=-1)


def finish_log_decay_grad(db, states, final, d_states, doc=None, *, chunk: int) -> jax.Array:
  """dL/dg float32 [B, T, H], chunk by chunk (see the module docstring).

  dg_s = sum_{t >= s in its chunk} (q_t . dq_t - k_t . dk_t) + <G_{c+1}, S_{c+1}>, and exactly
  0 where a document starts (its g multiplies a state that was reset; the sum would give 0 only
  up to rounding).
  """
  bsz, t, h = db.shape
  n = t // chunk
  db = db.reshape(bsz, n, chunk, h)
  local = jnp.flip(jnp.cumsum(jnp.flip(db, axis=2), axis=2), axis=2)
  leaving = jnp.concatenate([states[:, 1:], final[:, None]], axis=1)  # S_{c+1}
  through = jnp.sum(d_states * leaving, axis=(-2, -1))  # <G_{c+1}, S_{c+1}> [B, n, H]
  dg = (local + through[:, :, None]).reshape(bsz, t, h)
  if doc is not None:
    starts = jnp.concatenate([jnp.zeros_like(doc[:, :1], bool), doc[:, 1:] != doc[:, :-1]], 1)
    dg = jnp.where(starts[..., None], 0.0, dg)
  return dg


def chunked_reference(q, k, v, log_decay, *, segment_ids=None, initial_state=None,
                      scale: float = 1.0, chunk: int = 64) -> tuple[jax.Array, jax.Array]:
  """The chunked form in plain JAX, differentiated by JAX itself: (o float32, final state).

  Any T (the last chunk is padded). The 'reference' backend of the op.
  """
  bsz, t, h, dk = q.shape
  pad = -t % chunk
  if pad:
    q, k, v, log_decay = (jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
                          for x in (q, k, v, log_decay))
    if segment_ids is not None:
      segment_ids = jnp.pad(segment_ids, [(0, 0), (0, pad)], mode='edge')
  cw = chunk_weights(log_decay, segment_ids, chunk)
  initial = (jnp.zeros((bsz, h, dk, v.shape[-1]), jnp.float32) if initial_state is None
             else _f32(initial_state))
  states, final = chunk_states(k, v, cw.w, cw.carry, initial, chunk=chunk)
  o = chunk_output(q, k, _f32(v), cw.b, cw.doc, cw.u, states, chunk=chunk, scale=scale)
  return o[:, :t], final
