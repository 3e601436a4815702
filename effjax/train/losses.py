"""Cross-entropy from hidden states and the head, in sequence chunks, gradient formed on the way.

`chunked_cross_entropy(x, w, targets, weights, ...)` equals applying the head (x @ w, float32
logits) and summing softmax cross-entropy (+ z-loss), but never holds the [B, T, vocab] logits:
the sequence is cut into chunks of `chunk` positions and a lax.scan walks them. Its custom VJP
computes each chunk's logit gradient (softmax - onehot) right after the chunk's loss, turns it
into that chunk's input gradient and adds its head-weight gradient, so the backward pass is only a
scaling by the incoming cotangent. Nothing is recomputed: the FLOPs are those of the unfused head
(forward + two gradient matmuls), and the logits make one trip through memory per chunk instead of
the several an unfused loss needs (GPT-2-small on an H200: the unfused loss spends ~8 ms of a
68 ms step in elementwise passes over float32 [32k, 50304] logits).

Chunks run along the sequence, so the batch dimension keeps its data-parallel sharding and a
vocab-sharded head stays sharded (the log-sum-exp reduces across it).

The price: the forward also does the gradient work, so use it for training steps (the eval step
uses the plain head), and the second output (the cross-entropy part alone, for logging) has no
gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _chunk_terms(x_bcd, w_dv, targets_bc, weights_bc, z_loss, logits_dtype):
  """One chunk: logits (stored in logits_dtype, used in float32), cross-entropy, log-sum-exp."""
  logits = jnp.einsum('bcd,dv->bcv', x_bcd, w_dv, preferred_element_type=logits_dtype)
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets_bc[..., None], axis=-1)[..., 0]
  ce = (lse - target_logit) * weights_bc
  z = z_loss * jnp.square(lse) * weights_bc
  return logits, lse, ce, z


def _split(a, chunk):
  """[B, T, ...] -> [T/chunk, B, chunk, ...]."""
  b, t = a.shape[:2]
  return jnp.swapaxes(a.reshape(b, t // chunk, chunk, *a.shape[2:]), 0, 1)


def _merge(a):
  """[n, B, chunk, ...] -> [B, n*chunk, ...]."""
  a = jnp.swapaxes(a, 0, 1)
  return a.reshape(a.shape[0], a.shape[1] * a.shape[2], *a.shape[3:])


def _check(x_btd, chunk):
  t = x_btd.shape[1]
  if chunk <= 0 or t % chunk:
    raise ValueError(f'train.loss_chunk_size={chunk} must be positive and divide the sequence '
                     f'length {t}; use 0 for the unchunked loss')


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def chunked_cross_entropy(x_btd, w_dv, targets_bt, weights_bt, z_loss: float, chunk: int,
                          logits_dtype=jnp.float32):
  """(summed cross-entropy + z-loss, summed cross-entropy), both float32 scalars.

  logits_dtype is what the head matmul writes (it accumulates in float32 either way): float32 is
  exact; bfloat16 halves the bytes of the chunk's logits, as bf16-autocast training does.
  """
  _check(x_btd, chunk)

  def body(carry, inputs):
    x_bcd, targets_bc, weights_bc = inputs
    _, _, ce, z = _chunk_terms(x_bcd, w_dv, targets_bc, weights_bc, z_loss, logits_dtype)
    return (carry[0] + jnp.sum(ce) + jnp.sum(z), carry[1] + jnp.sum(ce)), None

  zero = jnp.zeros((), jnp.float32)
  (total, ce_sum), _ = jax.lax.scan(
      body, (zero, zero),
      (_split(x_btd, chunk), _split(targets_bt, chunk), _split(weights_bt.astype(jnp.float32),
                                                                chunk)))
  return total, ce_sum


def _fwd(x_btd, w_dv, targets_bt, weights_bt, z_loss, chunk, logits_dtype):
  _check(x_btd, chunk)
  vocab = w_dv.shape[1]

  def body(carry, inputs):
    total, ce_sum, dw = carry
    x_bcd, targets_bc, weights_bc = inputs
    logits, lse, ce, z = _chunk_terms(x_bcd, w_dv, targets_bc, weights_bc, z_loss, logits_dtype)
    probs = jnp.exp(logits - lse[..., None])
    # d(ce + z_loss * lse^2)/dlogits = softmax * (1 + 2 z_loss lse) - onehot, times the weight.
    scale = (1.0 + 2.0 * z_loss * lse) * weights_bc
    onehot = jax.nn.one_hot(targets_bc, vocab, dtype=jnp.float32)
    dlogits = (probs * scale[..., None] - onehot * weights_bc[..., None]).astype(x_bcd.dtype)
    dx = jnp.einsum('bcv,dv->bcd', dlogits, w_dv)
    dw = dw + jnp.einsum('bcd,bcv->dv', x_bcd, dlogits, preferred_element_type=jnp.float32)
    return (total + jnp.sum(ce) + jnp.sum(z), ce_sum + jnp.sum(ce), dw), dx

  zero = jnp.zeros((), jnp.float32)
  dw0 = jnp.zeros(w_dv.shape, jnp.float32)
  (total, ce_sum, dw), dx = jax.lax.scan(
      body, (zero, zero, dw0),
      (_split(x_btd, chunk), _split(targets_bt, chunk), _split(weights_bt.astype(jnp.float32),
                                                                chunk)))
  return (total, ce_sum), (_merge(dx), dw.astype(w_dv.dtype), targets_bt, weights_bt)


def _bwd(z_loss, chunk, logits_dtype, residuals, cotangents):
  del z_loss, chunk, logits_dtype
  dx, dw, targets_bt, weights_bt = residuals
  g_total, _ = cotangents  # the cross-entropy-only output is for logging: no gradient
  g = g_total.astype(jnp.float32)
  targets_ct = np.zeros(targets_bt.shape, jax.dtypes.float0)  # integer input: no cotangent
  return ((g * dx.astype(jnp.float32)).astype(dx.dtype),
          (g * dw.astype(jnp.float32)).astype(dw.dtype), targets_ct, jnp.zeros_like(weights_bt))


chunked_cross_entropy.defvjp(_fwd, _bwd)
