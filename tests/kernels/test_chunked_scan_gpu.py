"""The chunked scan's Pallas Triton kernels (gpu.py, interpret mode on CPU): each of the four steps
against its plain-JAX version in chunked.py on random inputs with document resets, the op with
backend='triton' against the chunked reference (outputs and every gradient, ragged length), and
validate()'s one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.kernels.chunked_scan import chunked, chunked_reference, chunked_scan, default_chunk
from effjax.kernels.chunked_scan import gpu

TOLERANCE = {'float32': 1e-4, 'bfloat16': 2e-2}

# name: (B, T, H, K, V, chunk, dtype, tiles); tiles force small scan tiles / head-dim slices (and
# the backward's column split) so the multi-block paths (several K and V programs, several slices
# per dot) run at small sizes.
CASES = {
    'f32': (2, 64, 2, 32, 16, 16, 'float32', None),
    'bf16': (1, 64, 2, 64, 32, 32, 'bfloat16', None),
    'f32_small_tiles': (1, 64, 2, 64, 32, 16, 'float32', 16),
    'f32_d256': (1, 32, 1, 256, 256, 16, 'float32', None),
}


def _close(got, want, tol):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape and np.isfinite(got).all()
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def _case(name):
  """Random step inputs for one case: token arrays, chunk weights with resets, random states."""
  b, t, h, dk, dv, chunk, dtype, tiles = CASES[name]
  rng = np.random.default_rng()
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  log_decay = jnp.asarray(-rng.uniform(0.0, 0.4, (b, t, h)), jnp.float32)
  segment_ids = jnp.asarray(np.sort(rng.integers(0, 4, (b, t)), axis=1), jnp.int32)
  cw = chunked.chunk_weights(log_decay, segment_ids, chunk)
  n = t // chunk
  x = {
      'q': normal(b, t, h, dk).astype(dtype), 'k': normal(b, t, h, dk).astype(dtype),
      'v': normal(b, t, h, dv).astype(dtype), 'do': normal(b, t, h, dv).astype(dtype),
      'start': normal(b, h, dk, dv), 'states': normal(b, n, h, dk, dv),
      'd_states': normal(b, n, h, dk, dv),
  }
  return x, cw, chunk, TOLERANCE[dtype], tiles


def _tile_kw(tiles, *names):
  return {} if tiles is None else {name: tiles for name in names}


@pytest.mark.parametrize('name', list(CASES))
def test_chunk_states(name):
  x, cw, chunk, tol, tiles = _case(name)
  got = jax.jit(lambda k, v, w, carry, start: gpu._scan(
      k, v, w, carry, start, chunk=chunk, reverse=False, mult=1.0, interpret=True,
      **_tile_kw(tiles, 'block_k', 'block_v')))(x['k'], x['v'], cw.w, cw.carry, x['start'])
  want = chunked.chunk_states(x['k'], x['v'], cw.w, cw.carry, x['start'], chunk=chunk)
  assert all(g.dtype == jnp.float32 for g in got)
  for g, w in zip(got, want):
    _close(g, w, tol)


@pytest.mark.parametrize('name', list(CASES))
def test_chunk_state_grads(name):
  x, cw, chunk, tol, tiles = _case(name)
  got = jax.jit(lambda q, do, u, carry, start: gpu._scan(
      q, do, u, carry, start, chunk=chunk, reverse=True, mult=0.7, interpret=True,
      **_tile_kw(tiles, 'block_k', 'block_v')))(x['q'], x['do'], cw.u, cw.carry, x['start'])
  want = chunked.chunk_state_grads(x['q'], x['do'], cw.u, cw.carry, x['start'], chunk=chunk,
                                   scale=0.7)
  for g, w in zip(got, want):
    _close(g, w, tol)


@pytest.mark.parametrize('name', list(CASES))
def test_chunk_output(name):
  x, cw, chunk, tol, tiles = _case(name)
  args = (x['q'], x['k'], x['v'], cw.b, cw.doc, cw.u, x['states'])
  got = jax.jit(lambda *a: gpu._output(*a, chunk=chunk, scale=0.7, interpret=True,
                                       **_tile_kw(tiles, 'block_v', 'sub')))(*args)
  want = chunked.chunk_output(*args, chunk=chunk, scale=0.7)
  assert got.dtype == x['v'].dtype
  _close(got, want, tol)


@pytest.mark.parametrize('name', list(CASES))
def test_chunk_backward(name):
  x, cw, chunk, tol, tiles = _case(name)
  args = (x['q'], x['k'], x['v'], x['do'], cw.b, cw.doc, cw.u, cw.w, x['states'], x['d_states'])
  small = {} if tiles is None else {'sub': tiles, 'split': 2}  # two programs share a chunk
  got = jax.jit(lambda *a: gpu._backward(*a, chunk=chunk, scale=0.7, interpret=True,
                                         **small))(*args)
  want = chunked.chunk_backward(*args, chunk=chunk, scale=0.7)
  for name, g, w, x_ in zip(('dq', 'dk', 'dv', 'db'), got, want,
                            (x['q'], x['k'], x['v'], None)):
    # Gradients leave in the inputs' dtypes, the decay term in float32 from unrounded values.
    assert g.dtype == (jnp.float32 if x_ is None else x_.dtype), name
    _close(g, w, tol)


def test_public_steps_match_xla():
  """The four public functions (default tiles) chained as the op chains them, on bfloat16."""
  x, cw, chunk, tol, _ = _case('bf16')

  def steps(mod):
    kw = {'chunk': chunk, 'interpret': True}
    states, final = mod.chunk_states(x['k'], x['v'], cw.w, cw.carry, x['start'], **kw)
    o = mod.chunk_output(x['q'], x['k'], x['v'], cw.b, cw.doc, cw.u, states, scale=0.7, **kw)
    d_states, d_start = mod.chunk_state_grads(x['q'], x['do'], cw.u, cw.carry, x['start'],
                                              scale=0.7, **kw)
    grads = mod.chunk_backward(x['q'], x['k'], x['v'], x['do'], cw.b, cw.doc, cw.u, cw.w,
                               states, d_states, scale=0.7, **kw)
    return states, final, o, d_states, d_start, *grads

  for got, want in zip(jax.jit(lambda: steps(gpu))(), steps(chunked)):
    _close(got, want, tol)


# ------------------------------------------------------------------------------------------------
# The op through backend='triton' against the chunked reference, values and gradients.


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_op_matches_reference(dtype):
  rng = np.random.default_rng()
  b, t, h, dk, dv, chunk = 2, 40, 2, 32, 16, 16  # 40 tokens: the last chunk is padded
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  q, k = normal(b, t, h, dk).astype(dtype), normal(b, t, h, dk).astype(dtype)
  v = normal(b, t, h, dv).astype(dtype)
  log_decay = jnp.asarray(-rng.uniform(0.0, 0.4, (b, t, h)), jnp.float32)
  segment_ids = jnp.asarray(np.sort(rng.integers(0, 3, (b, t)), axis=1), jnp.int32)
  initial = normal(b, h, dk, dv)
  w_out, w_final = normal(b, t, h, dv), normal(b, h, dk, dv)

  def value_and_grads(fn):
    def loss(*args):
      o, final = fn(*args)
      return jnp.sum(o.astype(jnp.float32) * w_out) + jnp.sum(final * w_final), (o, final)
    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)
    return jax.jit(grad)(q, k, v, log_decay, initial)

  kw = {'segment_ids': segment_ids, 'scale': 0.6}
  got_grads, (got_o, got_final) = value_and_grads(
      lambda q, k, v, g, s: chunked_scan(q, k, v, g, initial_state=s, chunk_size=chunk,
                                         backend='triton', interpret=True,
                                         return_final_state=True, **kw))
  want_grads, (want_o, want_final) = value_and_grads(
      lambda q, k, v, g, s: chunked_reference(q, k, v, g, initial_state=s, chunk=chunk, **kw))
  tol = TOLERANCE[dtype]
  assert got_o.dtype == v.dtype and got_o.shape == v.shape
  _close(got_o, want_o, tol)
  _close(got_final, want_final, tol)
  for name, g, w in zip(('q', 'k', 'v', 'log_decay', 'initial_state'), got_grads, want_grads):
    assert g.dtype == w.dtype, name
    _close(g, w, tol)


# ------------------------------------------------------------------------------------------------
# Shapes the kernels refuse, and the tile heuristics.


@pytest.mark.parametrize('override, match', [
    ({'chunk': 48}, r"chunk_size=48 must be a power of two in \[16, 128\] for backend='triton'; "
                    r"use backend='xla'"),
    ({'chunk': 8}, r'chunk_size=8 must be'),
    ({'chunk': 256}, r'chunk_size=256 must be'),
    ({'key_dim': 96}, r"key_dim=96 must be a power of two in \[16, 256\] for backend='triton'; "
                      r"pad the heads or use backend='xla'"),
    ({'key_dim': 8}, r'key_dim=8 must be'),
    ({'value_dim': 512}, r'value_dim=512 must be'),
    ({'dtype': jnp.int32}, r'dtype=int32 must be bfloat16, float16 or float32'),
])
def test_validate_errors(override, match):
  kw = {'chunk': 64, 'key_dim': 128, 'value_dim': 64, 'dtype': jnp.bfloat16, **override}
  with pytest.raises(ValueError, match=match) as info:
    gpu.validate(**kw)
  assert '\n' not in str(info.value)


def test_validate_accepts_supported_shapes():
  for chunk in gpu.CHUNKS:
    for dim in gpu.HEAD_DIMS:
      for dtype in gpu.DTYPES:
        gpu.validate(chunk=chunk, key_dim=dim, value_dim=dim, dtype=dtype)


def test_op_reports_validate_errors():
  rng = np.random.default_rng()
  q = jnp.asarray(rng.standard_normal((1, 32, 1, 96)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((1, 32, 1, 64)), jnp.float32)
  g = -jnp.asarray(rng.uniform(0.0, 1.0, (1, 32, 1)), jnp.float32)
  with pytest.raises(ValueError, match='key_dim=96'):
    chunked_scan(q, q, v, g, backend='triton', interpret=True)
  with pytest.raises(ValueError, match='chunk_size=48'):
    chunked_scan(v, v, v, g, chunk_size=48, backend='triton', interpret=True)
  assert default_chunk('triton') == gpu.DEFAULT_CHUNK


def test_scan_tiles():
  assert gpu.scan_tiles(64, 128, 128) == (64, 64)  # B4 H16 D128: 256 programs
  assert gpu.scan_tiles(128, 128, 128) == (64, 64)
  assert gpu.scan_tiles(2, 128, 128) == (32, 32)  # a small grid takes smaller tiles
  assert gpu.scan_tiles(64, 64, 64) == (32, 32)
  assert gpu.scan_tiles(8, 16, 16) == (16, 16)


@pytest.mark.parametrize('dims', [(128, 128), (128, 64), (256, 256)])
def test_kernels_lower_to_valid_triton_modules(dims, monkeypatch, capfd):
  """All four steps lowered for CUDA on this CPU machine (bf16, chunk 64): every Triton module
  verifies (tests/kernels/triton_lowering.py), which interpret mode cannot show."""
  from tests.kernels.triton_lowering import assert_verified, triton_dump
  b, t, h, c = 2, 128, 2, 64
  dk, dv = dims
  tok = lambda d: jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
  row = jax.ShapeDtypeStruct((b, t, h), jnp.float32)
  doc = jax.ShapeDtypeStruct((b, t), jnp.int32)
  carry = jax.ShapeDtypeStruct((b, t // c, h), jnp.float32)
  state = jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32)

  def steps(q, k, v, do, b_, doc_, u, w, carry_, start):
    states, final = gpu.chunk_states(k, v, w, carry_, start, chunk=c)
    o = gpu.chunk_output(q, k, v, b_, doc_, u, states, chunk=c, scale=0.5)
    d_states, d_start = gpu.chunk_state_grads(q, do, u, carry_, final, chunk=c, scale=0.5)
    return o, d_start, gpu.chunk_backward(q, k, v, do, b_, doc_, u, w, states, d_states,
                                          chunk=c, scale=0.5)

  dump = triton_dump(monkeypatch, capfd, gpu, steps, tok(dk), tok(dk), tok(dv), tok(dv), row,
                     doc, row, row, carry, state)
  assert_verified(dump, 4)
