"""Grouped matmul for dropless mixture-of-experts: one op, several backends, one specification.

`grouped_matmul(lhs [M, K], rhs [G, K, N], group_sizes [G])` multiplies each group's rows of lhs
(rows sorted by group, see reference.py) by that group's matrix, without padding groups to a
common capacity: an MoE layer sorts its tokens by expert and runs every expert in one call.
`transposed_grouped_matmul(lhs [M, K], rhs [M, N], group_sizes)` -> [G, K, N] is the per-group
lhs^T @ rhs, the weight gradient.

Backends: 'triton' (Pallas on GPU, gpu.py), 'mosaic' (Pallas on TPU, tpu.py), 'ragged_dot'
(jax.lax.ragged_dot, any device) and 'auto', which picks by the default JAX backend. Both ops are
differentiable in both arrays through custom VJPs built from each other:
  grouped_matmul:   d_lhs = grouped_matmul(d_out, rhs^T),  d_rhs = transposed(lhs, d_out);
  transposed:       d_lhs = grouped_matmul(rhs, d_out^T),  d_rhs = grouped_matmul(lhs, d_out),
  where the ^T of a weight is read in place by the Triton kernel (no transposed copy).
The kernel backends define reverse mode only (custom VJPs around opaque kernels). grouped_matmul
with 'ragged_dot' is XLA's op with JAX's own derivatives (the same formulas, forward mode
included, for Hessian-vector products), so it bypasses the custom VJP; JAX can't transpose the
ragged-contraction form behind transposed_grouped_matmul, so that op keeps its custom VJP on
every backend.

Tiling (tm, tk, tn): rows of lhs per m-tile, and the K and N tile widths. Defaults come per
backend and are fitted to the shapes (K and N tiles shrink to divide the dims, so weights are not
padded when K and N are multiples of 16 / 128); M, K and N are zero-padded internally to tile
multiples when needed and the result sliced back. Triton tiles are powers of two >= 16, Mosaic
tiles multiples of 128. Inputs of different float dtypes are promoted to a common one.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from effjax.kernels._compat import sum_to_varying
from effjax.kernels.grouped_matmul.reference import gmm_reference, tgmm_reference

__all__ = [
  'GMM_BACKENDS',
  'gmm_reference',
  'grouped_matmul',
  'tgmm_reference',
  'transposed_grouped_matmul',
]

# The accepted values of `backend`.
GMM_BACKENDS = ('auto', 'triton', 'mosaic', 'ragged_dot')
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
_TRITON_MIN_TILE = 16
_MOSAIC_TILE = 128


def resolve_backend(backend: str) -> str:
  """'auto' -> 'triton' on GPU, 'mosaic' on TPU, 'ragged_dot' elsewhere."""
  if backend not in GMM_BACKENDS:
    raise ValueError(f'backend must be one of {GMM_BACKENDS}, got {backend!r}')
  if backend != 'auto':
    return backend
  return {'gpu': 'triton', 'tpu': 'mosaic'}.get(jax.default_backend(), 'ragged_dot')


def _kernel_module(backend: str):
  if backend == 'triton':
    from effjax.kernels.grouped_matmul import gpu
    return gpu
  from effjax.kernels.grouped_matmul import tpu
  return tpu


# ----------------------------------------------------------------------------------------------
# Tiling


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _fit_width(dim: int, default: int, align: int, triton: bool) -> int:
  """The largest allowed tile <= default dividing dim rounded up to `align` (no weight padding
  when dim is aligned)."""
  padded = _round_up(dim, align)
  tile = default
  while tile > padded or padded % tile:
    tile = tile // 2 if triton else tile - align
  return tile


def default_tiling(backend: str, m: int, k: int, n: int,
                   op: str = 'gmm') -> tuple[int, int, int]:
  """(tm, tk, tn) for lhs [m, k] x [k, n] blocks, from the backend's defaults fitted to the dims;
  op 'tgmm' for the transposed product (tk x tn is then its output tile)."""
  tm, tk, tn = _kernel_module(backend).default_tiling(n=n, op=op)
  triton = backend == 'triton'
  align = _TRITON_MIN_TILE if triton else _MOSAIC_TILE
  # M is padded rather than tiled finer: finer m-tiles mean more visits, and M (tokens x top-k)
  # is usually a round number anyway.
  if triton:
    tm = min(tm, max(align, 1 << (max(m, 1) - 1).bit_length()))
  return tm, _fit_width(k, tk, align, triton), _fit_width(n, tn, align, triton)


def _check_tiling(backend: str, tiling) -> tuple[int, int, int]:
  if len(tiling) != 3:
    raise ValueError(f'tiling must be (tm, tk, tn), got {tiling!r}')
  for name, tile in zip(('tm', 'tk', 'tn'), tiling):
    if backend == 'triton' and (tile < _TRITON_MIN_TILE or tile & (tile - 1)):
      raise ValueError(f"{name}={tile} must be a power of two >= {_TRITON_MIN_TILE} for "
                       f"backend='triton'; pick another tiling or backend='ragged_dot'")
    if backend == 'mosaic' and (tile < _MOSAIC_TILE or tile % _MOSAIC_TILE):
      raise ValueError(f"{name}={tile} must be a multiple of {_MOSAIC_TILE} for "
                       f"backend='mosaic'; pick another tiling or backend='ragged_dot'")
  return tuple(int(t) for t in tiling)


def _pad(x: jax.Array, multiples: tuple[int, ...]) -> jax.Array:
  pads = [(0, _round_up(d, t) - d) for d, t in zip(x.shape, multiples)]
  return jnp.pad(x, pads) if any(hi for _, hi in pads) else x


# ----------------------------------------------------------------------------------------------
# The ops


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything besides arrays; hashable so it can be a custom_vjp nondiff arg."""
  backend: str
  tiling: tuple[int, int, int] | None
  interpret: bool
  out_dtype: jnp.dtype | None = None  # None: the inputs' dtype
  # gmm only: rhs comes as [G, N, K] and is used transposed (the backward's rhs^T without a copy;
  # the Triton kernel reads it in place, other backends transpose it first).
  transpose_rhs: bool = False

  def swapped(self, transpose_rhs: bool) -> '_Static':
    """The same op with the roles of K and N exchanged (a transposed product's tiling)."""
    tiling = None if self.tiling is None else (self.tiling[0], self.tiling[2], self.tiling[1])
    return dataclasses.replace(self, tiling=tiling, out_dtype=None, transpose_rhs=transpose_rhs)

  def plain(self) -> '_Static':
    return dataclasses.replace(self, out_dtype=None, transpose_rhs=False)


def _gmm_impl(lhs, rhs, group_sizes, static: _Static):
  in_place = static.transpose_rhs and static.backend == 'triton'
  if static.transpose_rhs and not in_place:
    rhs = jnp.swapaxes(rhs, 1, 2)
  if static.backend == 'ragged_dot':
    return gmm_reference(lhs, rhs, group_sizes, preferred_element_type=static.out_dtype,
                         precision=None)
  (m, k), n = lhs.shape, rhs.shape[1 if in_place else 2]
  tm, tk, tn = static.tiling or default_tiling(static.backend, m, k, n)
  kwargs = dict(transpose_rhs=True) if in_place else {}
  out = _kernel_module(static.backend).gmm(
      _pad(lhs, (tm, tk)), _pad(rhs, (1, tn, tk) if in_place else (1, tk, tn)), group_sizes,
      tiling=(tm, tk, tn), out_dtype=static.out_dtype or lhs.dtype, interpret=static.interpret,
      **kwargs)
  return out if out.shape == (m, n) else out[:m, :n]


def _tgmm_impl(lhs, rhs, group_sizes, static: _Static):
  if static.backend == 'ragged_dot':
    return tgmm_reference(lhs, rhs, group_sizes, preferred_element_type=static.out_dtype,
                          precision=None)
  (m, k), n = lhs.shape, rhs.shape[1]
  tm, tk, tn = static.tiling or default_tiling(static.backend, m, k, n, op='tgmm')
  out = _kernel_module(static.backend).tgmm(
      _pad(lhs, (tm, tk)), _pad(rhs, (tm, tn)), group_sizes, tiling=(tm, tk, tn),
      out_dtype=static.out_dtype or lhs.dtype, interpret=static.interpret)
  return out if out.shape[1:] == (k, n) else out[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(lhs, rhs, group_sizes, static: _Static):
  return _gmm_impl(lhs, rhs, group_sizes, static)


def _gmm_fwd(lhs, rhs, group_sizes, static: _Static):
  return _gmm_impl(lhs, rhs, group_sizes, static), (lhs, rhs, group_sizes)


def _gmm_bwd(static: _Static, residuals, d_out):
  lhs, rhs, group_sizes = residuals
  d_out = d_out.astype(lhs.dtype)
  # out = lhs @ B with B = rhs (or rhs^T): d_lhs = d_out @ B^T, the same rhs with the flag flipped.
  d_lhs = _gmm(d_out, rhs, group_sizes, static.swapped(transpose_rhs=not static.transpose_rhs))
  if static.transpose_rhs:  # rhs [G, N, K]
    d_rhs = _tgmm(d_out, lhs, group_sizes, static.swapped(False))
  else:
    d_rhs = _tgmm(lhs, d_out, group_sizes, static.plain())
  return sum_to_varying(d_lhs, lhs), sum_to_varying(d_rhs, rhs), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tgmm(lhs, rhs, group_sizes, static: _Static):
  return _tgmm_impl(lhs, rhs, group_sizes, static)


def _tgmm_fwd(lhs, rhs, group_sizes, static: _Static):
  return _tgmm_impl(lhs, rhs, group_sizes, static), (lhs, rhs, group_sizes)


def _tgmm_bwd(static: _Static, residuals, d_out):
  lhs, rhs, group_sizes = residuals
  d_out = d_out.astype(lhs.dtype)
  d_lhs = _gmm(rhs, d_out, group_sizes, static.swapped(transpose_rhs=True))  # rhs @ d_out^T
  d_rhs = _gmm(lhs, d_out, group_sizes, static.plain())
  return sum_to_varying(d_lhs, lhs), sum_to_varying(d_rhs, rhs), None


_tgmm.defvjp(_tgmm_fwd, _tgmm_bwd)


# ----------------------------------------------------------------------------------------------
# Public entry points


def _check_inputs(lhs, rhs, group_sizes, *, transposed: bool, preferred_element_type):
  """Validates shapes and dtypes; returns (compute dtype, int32 group_sizes, out dtype or None)."""
  group_sizes = jnp.asarray(group_sizes)
  if lhs.ndim != 2:
    raise ValueError(f'lhs must be 2-D [M, K], got shape {lhs.shape}')
  if transposed and (rhs.ndim != 2 or rhs.shape[0] != lhs.shape[0]):
    raise ValueError(f'rhs must be [M, N] with M={lhs.shape[0]} rows like lhs, got shape '
                     f'{rhs.shape}')
  if not transposed and (rhs.ndim != 3 or rhs.shape[1] != lhs.shape[1]):
    raise ValueError(f'rhs must be [G, K, N] with K={lhs.shape[1]} like lhs, got shape '
                     f'{rhs.shape}')
  for name, x in (('lhs', lhs), ('rhs', rhs)):
    if jnp.dtype(x.dtype) not in DTYPES:
      raise ValueError(f'{name} dtype must be bfloat16, float16 or float32, got {x.dtype}')
  if (preferred_element_type is not None and
      jnp.dtype(preferred_element_type) not in DTYPES):
    raise ValueError(f'preferred_element_type must be bfloat16, float16, float32 or None, got '
                     f'{preferred_element_type}')
  num_groups = group_sizes.shape[0] if group_sizes.ndim == 1 else -1
  if (group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer) or
      num_groups < 1 or (not transposed and num_groups != rhs.shape[0])):
    want = 'G >= 1' if transposed else f'G={rhs.shape[0]} (rhs.shape[0])'
    raise ValueError(f'group_sizes must be an integer vector [G] with {want}, got '
                     f'{group_sizes.dtype} {group_sizes.shape}')
  try:  # concrete sizes can be checked here; traced ones are clipped to M by the kernels
    sizes = np.asarray(group_sizes)
  except jax.errors.TracerArrayConversionError:
    sizes = None
  if sizes is not None and (sizes.min() < 0 or sizes.sum() > lhs.shape[0]):
    raise ValueError(f'group_sizes must be >= 0 and sum to at most M={lhs.shape[0]}, got sum '
                     f'{sizes.sum()} and min {sizes.min()}')
  dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
  out = None if preferred_element_type is None else jnp.dtype(preferred_element_type)
  return dtype, group_sizes.astype(jnp.int32), out


def _static(backend, tiling, interpret, out_dtype) -> _Static:
  backend = resolve_backend(backend)
  if tiling is not None and backend != 'ragged_dot':
    tiling = _check_tiling(backend, tiling)
  return _Static(backend, tiling, bool(interpret), out_dtype)


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                   backend: str = 'auto', tiling: tuple[int, int, int] | None = None,
                   interpret: bool = False, preferred_element_type=None) -> jax.Array:
  """lhs [M, K] (rows sorted by group) x rhs [G, K, N] -> [M, N]; rows past the groups are 0.

  Rows [offset_g, offset_g + group_sizes[g]) use rhs[g] (offset_g = sum(group_sizes[:g])).
  The result has preferred_element_type, else the inputs' (promoted) dtype. interpret=True runs
  the Pallas kernel in interpret mode (CPU tests).
  """
  dtype, group_sizes, out_dtype = _check_inputs(
      lhs, rhs, group_sizes, transposed=False, preferred_element_type=preferred_element_type)
  static = _static(backend, tiling, interpret, out_dtype)
  if static.backend == 'ragged_dot':
    return _gmm_impl(lhs.astype(dtype), rhs.astype(dtype), group_sizes, static)
  return _gmm(lhs.astype(dtype), rhs.astype(dtype), group_sizes, static)


def transposed_grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                              backend: str = 'auto', tiling: tuple[int, int, int] | None = None,
                              interpret: bool = False,
                              preferred_element_type=None) -> jax.Array:
  """lhs [M, K], rhs [M, N] -> [G, K, N]: out[g] = lhs[rows of g]^T @ rhs[rows of g].

  Empty groups give zeros; rows past sum(group_sizes) are ignored. Same options as
  grouped_matmul; tiling (tm, tk, tn) tiles M, K and N.
  """
  dtype, group_sizes, out_dtype = _check_inputs(
      lhs, rhs, group_sizes, transposed=True, preferred_element_type=preferred_element_type)
  static = _static(backend, tiling, interpret, out_dtype)
  return _tgmm(lhs.astype(dtype), rhs.astype(dtype), group_sizes, static)
