"""The Mosaic TPU chunked-scan kernels (run on CPU in TPU interpret mode) against chunked.py.

Each of the four steps against its plain-JAX twin on random inputs with document resets, a
nonzero initial state and a final-state cotangent, in float32 (tight) and bfloat16 (loose); the
public op with backend='mosaic' against chunked_reference for the output, the final state and
every gradient, with a ragged length; validate()'s errors; and the Mosaic lowering from CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from effjax.kernels.chunked_scan import chunked, chunked_reference, chunked_scan, tpu

C = tpu.DEFAULT_CHUNK


def _normal(rng, shape, dtype=jnp.float32):
  return jnp.asarray(rng.standard_normal(shape), dtype)


def _segments(rng, batch, length):
  """int32 [B, T] sorted ids. Row 0 starts a document exactly on the second chunk's first token,
  every row one more at a random token; the other chunks keep a nonzero carry."""
  ids = np.zeros((batch, length), np.int32)
  for row in range(batch):
    cuts = [int(rng.integers(1, length))] + ([C] if row == 0 and length > C else [])
    ids[row] = 7 + np.searchsorted(np.sort(cuts), np.arange(length), side='right')
  return jnp.asarray(ids)


def _problem(rng, batch, length, heads, dk, dv, dtype=jnp.float32):
  """q, k, v, do, log_decay, segment_ids; the token arrays in dtype. Head 0 decays slowly (a
  chunk's carry is about exp(-1.3)), the others fast (about exp(-19)): both regimes matter."""
  q, k = (_normal(rng, (batch, length, heads, dk), dtype) for _ in range(2))
  v, do = (_normal(rng, (batch, length, heads, dv), dtype) for _ in range(2))
  rate = np.where(np.arange(heads) == 0, 0.02, 0.3)
  g = -jnp.asarray(rng.uniform(0.0, 1.0, (batch, length, heads)) * rate, jnp.float32)
  return q, k, v, do, g, _segments(rng, batch, length)


def _close(got, want, tol, name=''):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape, name
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(np.abs(want).max()),
                             err_msg=name)


TOL = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2}


# ----------------------------------------------------------------------------- the four steps


@pytest.mark.parametrize('dtype,dk,dv', [(jnp.float32, 64, 128), (jnp.bfloat16, 128, 64)])
def test_chunk_states_and_state_grads(dtype, dk, dv):
  rng = np.random.default_rng()
  b, t, h = 2, 3 * C, 2
  q, k, v, do, g, seg = _problem(rng, b, t, h, dk, dv, dtype)
  cw = chunked.chunk_weights(g, seg, C)
  initial, d_final = _normal(rng, (b, h, dk, dv)), _normal(rng, (b, h, dk, dv))

  got = tpu.chunk_states(k, v, cw.w, cw.carry, initial, chunk=C, interpret=True)
  want = chunked.chunk_states(k, v, cw.w, cw.carry, initial, chunk=C)
  for name, x, y in zip(('states', 'final'), got, want):
    assert x.dtype == jnp.float32, name
    _close(x, y, TOL[dtype], name)

  got = tpu.chunk_state_grads(q, do, cw.u, cw.carry, d_final, chunk=C, scale=0.3, interpret=True)
  want = chunked.chunk_state_grads(q, do, cw.u, cw.carry, d_final, chunk=C, scale=0.3)
  for name, x, y in zip(('d_states', 'd_initial'), got, want):
    assert x.dtype == jnp.float32, name
    _close(x, y, TOL[dtype], name)


@pytest.mark.parametrize('dtype,dk,dv', [(jnp.float32, 64, 64), (jnp.float32, 256, 256),
                                         (jnp.bfloat16, 128, 64)])
def test_chunk_output_and_backward(dtype, dk, dv):
  """Per-chunk kernels on random states (not the scan's), so they are tested on their own."""
  rng = np.random.default_rng()
  b, t, h = 1, 2 * C, 2
  q, k, v, do, g, seg = _problem(rng, b, t, h, dk, dv, dtype)
  cw = chunked.chunk_weights(g, seg, C)
  states, d_states = (_normal(rng, (b, t // C, h, dk, dv)) for _ in range(2))
  scale = dk ** -0.5

  got = tpu.chunk_output(q, k, v, cw.b, cw.doc, cw.u, states, chunk=C, scale=scale,
                         interpret=True)
  want = chunked.chunk_output(q, k, v, cw.b, cw.doc, cw.u, states, chunk=C, scale=scale)
  assert got.dtype == v.dtype
  _close(got, want, TOL[dtype], 'o')

  args = (q, k, v, do, cw.b, cw.doc, cw.u, cw.w, states, d_states)
  got = tpu.chunk_backward(*args, chunk=C, scale=scale, interpret=True)
  want = chunked.chunk_backward(*args, chunk=C, scale=scale)
  for name, x, y in zip(('dq', 'dk', 'dv', 'db'), got, want):
    assert x.dtype == jnp.float32, name
    _close(x, y, TOL[dtype], name)


# ----------------------------------------------------------------------------- the public op


def _loss_and_grads(fn, q, k, v, g, initial, do, d_final):
  """(loss, the five gradients, (o, final)): one forward serves the outputs and the backward."""
  def loss(q, k, v, g, initial):
    o, final = fn(q, k, v, g, initial)
    return (jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)) +
            jnp.sum(final * d_final)), (o, final)
  (value, outputs), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(
      q, k, v, g, initial)
  return value, grads, outputs


@pytest.mark.parametrize('dtype,length,dk,dv', [(jnp.float32, 2 * C + 37, 64, 64),
                                                (jnp.bfloat16, C + 50, 128, 64)])
def test_public_op_matches_reference(dtype, length, dk, dv):
  """chunked_scan(backend='mosaic'): output, final state and all five gradients; ragged T."""
  rng = np.random.default_rng()
  b, h = 1, 2
  q, k, v, do, g, seg = _problem(rng, b, length, h, dk, dv, dtype)
  initial, d_final = _normal(rng, (b, h, dk, dv)), _normal(rng, (b, h, dk, dv))
  opts = dict(segment_ids=seg, scale=dk ** -0.5, return_final_state=True)

  def mosaic(q, k, v, g, initial):
    return chunked_scan(q, k, v, g, initial_state=initial, backend='mosaic', interpret=True,
                        **opts)

  def reference(q, k, v, g, initial):
    o, final = chunked_reference(q, k, v, g, initial_state=initial, chunk=C, segment_ids=seg,
                                 scale=opts['scale'])
    return o.astype(v.dtype), final

  with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
    # The op really runs the kernels: chunk_states and chunk_output forward, all four backward.
    jaxpr = str(jax.make_jaxpr(lambda *a: _loss_and_grads(mosaic, *a))(q, k, v, g, initial, do,
                                                                         d_final))
    assert jaxpr.count('pallas_call') >= 5
    got = jax.jit(lambda *a: _loss_and_grads(mosaic, *a))(q, k, v, g, initial, do, d_final)
  want = _loss_and_grads(reference, q, k, v, g, initial, do, d_final)
  (o, final), (want_o, want_final) = got[2], want[2]

  tol = TOL[dtype]
  assert o.shape == (b, length, h, dv) and o.dtype == v.dtype
  _close(o, want_o, tol, 'o')
  _close(final, want_final, tol, 'final')
  # The loss is linear in (o, final), a sum with heavy cancellation: its error is bounded by the
  # outputs' errors weighted by the cotangents, not by a fraction of its own (small) value.
  f32 = lambda x: np.asarray(x, np.float32)
  bound = (np.sum(np.abs(f32(o) - f32(want_o)) * np.abs(f32(do))) +
           np.sum(np.abs(f32(final) - f32(want_final)) * np.abs(f32(d_final))))
  scale = (np.sum(np.abs(f32(want_o) * f32(do))) +
           np.sum(np.abs(f32(want_final) * f32(d_final))))
  assert abs(float(got[0]) - float(want[0])) <= 1.01 * bound + 1e-5 * scale, 'loss'
  for name, x, y, like in zip(('dq', 'dk', 'dv', 'dlog_decay', 'dinitial'), got[1], want[1],
                              (q, k, v, g, initial)):
    assert x.dtype == like.dtype, name
    _close(x, y, tol, name)


def test_public_op_float16_without_segments():
  rng = np.random.default_rng()
  q, k, v, _, g, _ = _problem(rng, 1, C, 2, 64, 64, jnp.float16)
  with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
    o = chunked_scan(q, k, v, g, scale=0.125, backend='mosaic', interpret=True)
  want, _ = chunked_reference(q, k, v, g, scale=0.125, chunk=C)
  assert o.dtype == jnp.float16
  _close(o, want, 2e-3, 'o')


# ----------------------------------------------------------------------------- constraints


@pytest.mark.parametrize('kwargs,match', [
    (dict(chunk=64), "chunk_size=64 must be a multiple of 128 for backend='mosaic'; use"),
    (dict(key_dim=40), "key_dim=40 must be a multiple of 16 and at most 512"),
    (dict(value_dim=1024), "value_dim=1024 must be a multiple of 16 and at most 512"),
    (dict(dtype=jnp.int32), "dtype=int32 is not supported by backend='mosaic'"),
    (dict(chunk=512, key_dim=512, value_dim=512, dtype=jnp.float32), 'MiB of VMEM'),
])
def test_validate_names_the_constraint(kwargs, match):
  args = dict(chunk=C, key_dim=64, value_dim=64, dtype=jnp.bfloat16) | kwargs
  with pytest.raises(ValueError, match=match):
    tpu.validate(**args)


def test_validate_accepts_the_supported_shapes():
  for dk, dv in ((64, 64), (128, 64), (128, 128), (256, 256), (256, 512)):
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
      tpu.validate(chunk=C, key_dim=dk, value_dim=dv, dtype=dtype)


def test_public_op_reports_the_chunk_constraint():
  q, k, v, _, g, _ = _problem(np.random.default_rng(), 1, C, 1, 64, 64)
  with pytest.raises(ValueError, match="chunk_size=64 must be a multiple of 128"):
    chunked_scan(q, k, v, g, chunk_size=64, backend='mosaic', interpret=True)


@pytest.mark.parametrize('dtype,dk,dv,chunk', [(jnp.bfloat16, 64, 128, 256),
                                               (jnp.float32, 256, 64, 128),
                                               (jnp.float16, 128, 128, 128)])
def test_lowers_to_mosaic(dtype, dk, dv, chunk):
  """All four kernels pass Pallas' Mosaic lowering (block-shape rules, op support) from CPU."""
  b, t, h = 1, 512, 2
  tok_k = jax.ShapeDtypeStruct((b, t, h, dk), dtype)
  tok_v = jax.ShapeDtypeStruct((b, t, h, dv), dtype)
  per_token = jax.ShapeDtypeStruct((b, t, h), jnp.float32)
  state = jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32)

  def steps(q, k, v, do, g, initial):
    cw = chunked.chunk_weights(g, None, chunk)
    states, final = tpu.chunk_states(k, v, cw.w, cw.carry, initial, chunk=chunk)
    o = tpu.chunk_output(q, k, v, cw.b, cw.doc, cw.u, states, chunk=chunk, scale=0.1)
    d_states, d_initial = tpu.chunk_state_grads(q, do, cw.u, cw.carry, final, chunk=chunk,
                                                scale=0.1)
    grads = tpu.chunk_backward(q, k, v, do, cw.b, cw.doc, cw.u, cw.w, states, d_states,
                               chunk=chunk, scale=0.1)
    return o, d_initial, grads
  lowered = jax.jit(steps).trace(tok_k, tok_k, tok_v, tok_v, per_token, state).lower(
      lowering_platforms=('tpu',))
  assert lowered.as_text().count('tpu_custom_call') == 4
