"""Grouped matmul: the reference against explicit loops, the visit tables against brute force, and
the Pallas kernels (Triton in interpret mode, Mosaic in TPU interpret mode, both on CPU) against
the reference, values and gradients of both arguments (against jax.grad through ragged_dot)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.kernels.grouped_matmul import (
  GMM_BACKENDS,
  gmm_reference,
  grouped_matmul,
  resolve_backend,
  tgmm_reference,
  transposed_grouped_matmul,
)
from effjax.kernels.grouped_matmul import schedule

# Small tiles so tiny shapes still span several tiles and straddle group boundaries.
KERNELS = {
  'triton': dict(backend='triton', interpret=True, tiling=(16, 32, 16)),
  'mosaic': dict(backend='mosaic', interpret=True, tiling=(128, 128, 128)),
}


def _group_sizes(rng, m: int, g: int, *, fill: bool) -> np.ndarray:
  """Uneven random sizes with some zeros; summing to m when fill, else to less than m."""
  total = m if fill else int(rng.integers(0, m))
  cuts = np.sort(rng.integers(0, total + 1, size=g - 1))
  sizes = np.diff(np.concatenate([[0], cuts, [total]]))
  sizes[rng.random(g) < 0.25] = 0  # more empty groups (the sum only shrinks)
  return sizes.astype(np.int32)


def _shapes(rng):
  return (int(rng.integers(64, 301)), int(rng.integers(32, 257)), int(rng.integers(32, 257)),
          int(rng.integers(1, 10)))


def _normal(rng, shape, dtype=jnp.float32):
  return jnp.asarray(rng.standard_normal(shape), dtype)


def _loops(lhs, rhs, d_out, sizes):
  """gmm and tgmm by explicit per-group numpy products."""
  lhs, rhs, d_out = (np.asarray(x, np.float64) for x in (lhs, rhs, d_out))
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  weight_grad = np.zeros(rhs.shape)
  for g in range(len(sizes)):
    rows = slice(offsets[g], offsets[g + 1])
    out[rows] = lhs[rows] @ rhs[g]
    weight_grad[g] = lhs[rows].T @ d_out[rows]
  return out, weight_grad


# ------------------------------------------------------------------------------------------------
# The reference and the schedule.


@pytest.mark.parametrize('fill', [True, False])
def test_reference_matches_loops(fill):
  rng = np.random.default_rng()
  m, k, n, g = _shapes(rng)
  sizes = _group_sizes(rng, m, g, fill=fill)
  lhs, rhs, d_out = _normal(rng, (m, k)), _normal(rng, (g, k, n)), _normal(rng, (m, n))
  want_out, want_tgmm = _loops(lhs, rhs, d_out, sizes)
  np.testing.assert_allclose(gmm_reference(lhs, rhs, jnp.asarray(sizes)), want_out, rtol=1e-5,
                             atol=1e-4)
  np.testing.assert_allclose(tgmm_reference(lhs, d_out, jnp.asarray(sizes)), want_tgmm,
                             rtol=1e-5, atol=1e-4)


def test_visit_tables_partition_rows():
  rng = np.random.default_rng()
  builders = {kind: jax.jit(getattr(schedule, f'{kind}_visits'), static_argnums=(1, 2))
              for kind in ('gmm', 'tgmm')}
  tm = 16
  for _ in range(12):
    rows, g = tm * int(rng.integers(1, 6)), int(rng.integers(1, 6))
    sizes = _group_sizes(rng, rows, g, fill=bool(rng.integers(2)))
    if rng.random() < 0.1:
      sizes[:] = 0
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    group_of_row = np.searchsorted(offsets, np.arange(rows), side='right') - 1
    group_of_row[np.arange(rows) >= offsets[-1]] = g  # the zero tail segment

    for kind in ('gmm', 'tgmm'):
      visits = builders[kind](jnp.asarray(sizes), rows, tm)
      tile, group, lo, hi = (np.asarray(x) for x in visits)
      bound = rows // tm + g - (kind == 'tgmm')
      assert tile.shape == (bound,)
      assert np.all(np.diff(tile) >= 0) and np.all(np.diff(group) >= 0)
      assert np.all(tile * tm <= lo) and np.all(hi <= tile * tm + tm) and np.all(lo <= hi)
      owners = np.zeros(rows, int)
      for v in range(bound):
        owners[lo[v]:hi[v]] += 1
        assert np.all(group_of_row[lo[v]:hi[v]] == group[v])
      covered = np.arange(rows) < (rows if kind == 'gmm' else offsets[-1])
      np.testing.assert_array_equal(owners, covered.astype(int))
      if kind == 'tgmm':  # every group's output gets written, the empty ones too
        assert set(range(g)) <= set(group.tolist()) and group.max() == g - 1


# ------------------------------------------------------------------------------------------------
# Kernels in interpret mode against the reference.


@pytest.mark.parametrize('kernel', ['triton', 'triton', 'mosaic'])
def test_kernel_values(kernel):
  rng = np.random.default_rng()
  m, k, n, g = _shapes(rng)
  sizes = jnp.asarray(_group_sizes(rng, m, g, fill=bool(rng.integers(2))))
  lhs, rhs, d_out = _normal(rng, (m, k)), _normal(rng, (g, k, n)), _normal(rng, (m, n))
  kw = KERNELS[kernel]
  out, weight_grad = jax.jit(lambda a, b, d, s: (
      grouped_matmul(a, b, s, **kw), transposed_grouped_matmul(a, d, s, **kw)))(
          lhs, rhs, d_out, sizes)
  assert out.shape == (m, n) and weight_grad.shape == (g, k, n)
  np.testing.assert_allclose(out, gmm_reference(lhs, rhs, sizes), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(weight_grad, tgmm_reference(lhs, d_out, sizes), rtol=1e-5,
                             atol=1e-4)


@pytest.mark.parametrize('kernel', ['triton', 'mosaic'])
def test_kernel_edge_groups(kernel):
  """One group, all groups empty, and groups ending exactly on tile boundaries."""
  rng = np.random.default_rng()
  tm = KERNELS[kernel]['tiling'][0]
  m, k, n = 3 * tm, 32, 48
  lhs, d_out = _normal(rng, (m, k)), _normal(rng, (m, n))
  cases = [np.array([m - int(rng.integers(1, tm))]), np.zeros(3), np.array([tm, 0, 2 * tm])]
  for sizes in cases:
    sizes = jnp.asarray(sizes, jnp.int32)
    rhs = _normal(rng, (len(sizes), k, n))
    out = grouped_matmul(lhs, rhs, sizes, **KERNELS[kernel])
    weight_grad = transposed_grouped_matmul(lhs, d_out, sizes, **KERNELS[kernel])
    np.testing.assert_allclose(out, gmm_reference(lhs, rhs, sizes), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(weight_grad, tgmm_reference(lhs, d_out, sizes), rtol=1e-5,
                               atol=1e-4)


@pytest.mark.parametrize('kernel', ['triton', 'mosaic'])
def test_kernel_gradients_match_ragged_dot(kernel):
  rng = np.random.default_rng()
  m, k, n, g = _shapes(rng)
  sizes = jnp.asarray(_group_sizes(rng, m, g, fill=False))
  lhs, rhs, w = _normal(rng, (m, k)), _normal(rng, (g, k, n)), _normal(rng, (m, n))

  def value_and_grads(fn):
    loss = lambda a, b: jnp.sum(fn(a, b) * w)
    return jax.jit(lambda a, b: (fn(a, b), jax.grad(loss, argnums=(0, 1))(a, b)))(lhs, rhs)

  out, grads = value_and_grads(lambda a, b: grouped_matmul(a, b, sizes, **KERNELS[kernel]))
  want, want_grads = value_and_grads(lambda a, b: jax.lax.ragged_dot(a, b, sizes))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)
  for got, expected in zip(grads, want_grads):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_transposed_gradients_match_ragged_dot():
  rng = np.random.default_rng()
  m, k, n, g = _shapes(rng)
  sizes = jnp.asarray(_group_sizes(rng, m, g, fill=False))
  lhs, rhs, w = _normal(rng, (m, k)), _normal(rng, (m, n)), _normal(rng, (g, k, n))
  loss = lambda fn: lambda a, b: jnp.sum(fn(a, b) * w)
  ours = lambda a, b: transposed_grouped_matmul(a, b, sizes, **KERNELS['triton'])
  grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(lhs, rhs)
  # XLA's ragged contraction has no transpose rule; a one-hot product is differentiable.
  onehot = jnp.arange(m)[:, None] < jnp.cumsum(sizes)[None, :]
  onehot = (onehot & ~jnp.pad(onehot, ((0, 0), (1, 0)))[:, :-1]).astype(jnp.float32)
  spec = lambda a, b: jnp.einsum('mg,mk,mn->gkn', onehot, a, b,
                                 precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(spec(lhs, rhs), tgmm_reference(lhs, rhs, sizes), rtol=1e-5,
                             atol=1e-4)
  want = jax.grad(loss(spec), argnums=(0, 1))(lhs, rhs)
  for got, expected in zip(grads, want):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_bfloat16_kernel():
  rng = np.random.default_rng()
  m, k, n, g = _shapes(rng)
  sizes = jnp.asarray(_group_sizes(rng, m, g, fill=True))
  lhs, rhs, w = (_normal(rng, s, jnp.bfloat16) for s in ((m, k), (g, k, n), (m, n)))
  op = lambda a, b: grouped_matmul(a, b, sizes, **KERNELS['triton'])
  out, grads = jax.jit(lambda a, b: (
      op(a, b), jax.grad(lambda a, b: jnp.sum(op(a, b).astype(jnp.float32) * w),
                         argnums=(0, 1))(a, b)))(lhs, rhs)
  assert out.dtype == jnp.bfloat16 and grads[0].dtype == grads[1].dtype == jnp.bfloat16
  wide = grouped_matmul(lhs, rhs, sizes, preferred_element_type=jnp.float32, **KERNELS['triton'])
  assert wide.dtype == jnp.float32

  f32 = lambda x: x.astype(jnp.float32)
  loss = lambda a, b: jnp.sum(jax.lax.ragged_dot(a, b, sizes) * f32(w))
  want_out = jax.lax.ragged_dot(f32(lhs), f32(rhs), sizes)
  want_grads = jax.grad(loss, argnums=(0, 1))(f32(lhs), f32(rhs))
  for got, want in zip((out, wide, *grads), (want_out, want_out, *want_grads)):
    err = np.max(np.abs(np.asarray(f32(got)) - np.asarray(want)))
    assert err <= 2e-2 * np.max(np.abs(np.asarray(want))), err


def test_auto_backend_is_ragged_dot_on_cpu():
  rng = np.random.default_rng()
  assert resolve_backend('auto') == 'ragged_dot' and 'ragged_dot' in GMM_BACKENDS
  m, k, n, g = _shapes(rng)
  sizes = jnp.asarray(_group_sizes(rng, m, g, fill=False))
  lhs, rhs = _normal(rng, (m, k)), _normal(rng, (g, k, n))
  np.testing.assert_allclose(grouped_matmul(lhs, rhs, sizes), gmm_reference(lhs, rhs, sizes),
                             rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Errors: one line each, naming the constraint.


@pytest.mark.parametrize('case, match', [
  ('lhs_3d', 'lhs must be 2-D'),
  ('rhs_2d', r'rhs must be \[G, K, N\]'),
  ('k_mismatch', 'K=32 like lhs'),
  ('float_sizes', 'group_sizes must be an integer vector'),
  ('sizes_vs_rhs', r'G=3 \(rhs.shape\[0\]\)'),
  ('sizes_too_big', 'sum to at most M=64'),
  ('int_dtype', 'lhs dtype must be bfloat16, float16 or float32'),
  ('backend', 'backend must be one of'),
  ('triton_tile', "power of two >= 16 for backend='triton'"),
  ('mosaic_tile', "multiple of 128 for backend='mosaic'"),
  ('transposed_rows', r'rhs must be \[M, N\] with M=64'),
])
def test_errors(case, match):
  rng = np.random.default_rng()
  lhs, rhs = _normal(rng, (64, 32)), _normal(rng, (3, 32, 16))
  sizes = jnp.asarray([10, 20, 30], jnp.int32)
  calls = {
    'lhs_3d': lambda: grouped_matmul(lhs[None], rhs, sizes),
    'rhs_2d': lambda: grouped_matmul(lhs, rhs[0], sizes),
    'k_mismatch': lambda: grouped_matmul(lhs, rhs[:, :16], sizes),
    'float_sizes': lambda: grouped_matmul(lhs, rhs, sizes.astype(jnp.float32)),
    'sizes_vs_rhs': lambda: grouped_matmul(lhs, rhs, sizes[:2]),
    'sizes_too_big': lambda: grouped_matmul(lhs, rhs, sizes * 2),
    'int_dtype': lambda: grouped_matmul(lhs.astype(jnp.int32), rhs, sizes),
    'backend': lambda: grouped_matmul(lhs, rhs, sizes, backend='cuda'),
    'triton_tile': lambda: grouped_matmul(lhs, rhs, sizes, backend='triton', tiling=(24, 32, 32)),
    'mosaic_tile': lambda: grouped_matmul(lhs, rhs, sizes, backend='mosaic', tiling=(128, 64, 128)),
    'transposed_rows': lambda: transposed_grouped_matmul(lhs, lhs[:32], sizes),
  }
  with pytest.raises(ValueError, match=match) as info:
    calls[case]()
  assert '\n' not in str(info.value)


@pytest.mark.parametrize('op', ['gmm', 'tgmm'])
def test_triton_kernels_lower_to_a_valid_triton_module(op, monkeypatch, capfd):
  """Lowered for CUDA on this CPU machine, the Triton modules verify (tests/kernels/
  triton_lowering.py): a loop bound of the wrong integer type once failed only on the GPU."""
  from effjax.kernels.grouped_matmul import gpu
  from tests.kernels.triton_lowering import assert_verified, triton_dump
  rows, k, n, groups = 256, 128, 128, 4
  lhs = jax.ShapeDtypeStruct((rows, k), jnp.bfloat16)
  sizes = jax.ShapeDtypeStruct((groups,), jnp.int32)
  if op == 'gmm':
    fn = lambda a, b, g: gpu.gmm(a, b, g, tiling=(64, 64, 64), out_dtype=jnp.bfloat16)
    rhs = jax.ShapeDtypeStruct((groups, k, n), jnp.bfloat16)
  else:
    fn = lambda a, b, g: gpu.tgmm(a, b, g, tiling=(64, 64, 64), out_dtype=jnp.bfloat16)
    rhs = jax.ShapeDtypeStruct((rows, n), jnp.bfloat16)
  dump = triton_dump(monkeypatch, capfd, gpu, fn, lhs, rhs, sizes)
  assert 'scf.for %' in dump  # the loop, printed in its verified (custom) form
  assert_verified(dump, 1)


@pytest.mark.parametrize('rows,cols', [(1, 1), (7, 3), (8, 5), (21, 112), (64, 2)])
def test_banded_program_order_visits_every_tile_once(rows, cols):
  """The Triton kernels' 1-D grid walks bands of BAND rows across all columns: a bijection."""
  from effjax.kernels.grouped_matmul import gpu
  r, c = jax.jit(lambda pid: gpu._banded(pid, rows, cols))(jnp.arange(rows * cols))  # pylint: disable=protected-access
  pairs = set(zip(np.asarray(r).tolist(), np.asarray(c).tolist()))
  assert pairs == {(i, j) for i in range(rows) for j in range(cols)}
  # The first band's programs come first and stay within its rows.
  first = min(rows, gpu.BAND) * cols
  assert int(np.max(np.asarray(r)[:first])) < gpu.BAND
