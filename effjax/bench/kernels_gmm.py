"""The grouped-matmul rows of the kernel benchmark (--op=gmm): MoE expert matmuls.

    python -m effjax.bench kernels --op=gmm [--grid=default|tune|tiny]
        [--impls=effjax,tokamax,ragged_dot,einsum]

One row multiplies M token rows, sorted by expert, by their expert's [K, N] matrix (G experts):
  effjax      effjax.kernels.grouped_matmul (backend 'auto': Pallas Triton on GPU, Mosaic on TPU,
              jax.lax.ragged_dot elsewhere, recorded as `backend`);
  tokamax     tokamax.ragged_dot(..., implementation='mosaic'): Google's Pallas Mosaic GPU kernel
              library, an optional peer (rows say 'skipped' where it is not installed);
  ragged_dot  jax.lax.ragged_dot, XLA's own grouped matmul;
  einsum      the same FLOPs as a dense batched einsum [G, M/G, K] x [G, K, N] (every expert
              exactly M/G rows): what a grouped matmul would reach with no raggedness at all,
              the baseline every row is compared with.
Group sizes come in two variants: 'uniform' (M/G each, the einsum's case) and 'skewed' (a
multinomial draw of M rows over probabilities from a flat Dirichlet: uneven, some groups small
or empty; a fresh draw per input set), each compared with the same implementation's uniform row
and with the einsum's ('vs einsum uniform'). 'fwd' is the product; 'fwd+bwd' returns it with
both gradients of sum(out * cotangent): d_lhs (another grouped matmul) and d_rhs (the transposed
grouped product, effjax's transposed_grouped_matmul). FLOPs are 2*M*K*N forward, 3x that with
the backward. (The H200 files in experiments/moe/results/h200_2026_12_02*/ timed the two
gradients alone: XLA removed the unused product, so their fwd+bwd TFLOP/s overstate the work
done by 1.5x, for every implementation alike.)

Default grid: 16k rows; Mixtral-like experts (8 x 4096 x 14336, and the down projection
8 x 14336 x 4096) and fine-grained ones (64 x 2048 x 1408 and 64 x 1408 x 2048, DeepSeek-MoE-like
widths), bf16 in and out with float32 accumulation. The 'tune' grid runs effjax alone at the
first, third and fourth of those shapes (uniform groups) for a list of Triton tilings (tm, tk, tn), each
row named 'effjax tm,tk,tn', to choose the defaults from. 'experts64' is the default grid's two
64-expert shapes alone. The tiny grid is the same path at CPU sizes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from effjax.bench import kernels as kb


@dataclasses.dataclass(frozen=True)
class GmmGrid:
  rows: int  # M: tokens x top-k routed slots
  shapes: tuple[tuple[int, int, int], ...]  # (G, K, N)


GMM_GRIDS = {
    'default': GmmGrid(rows=16384, shapes=((8, 4096, 14336), (8, 14336, 4096),
                                           (64, 2048, 1408), (64, 1408, 2048))),
    'tune': GmmGrid(rows=16384, shapes=((8, 4096, 14336), (64, 2048, 1408), (64, 1408, 2048))),
    'experts64': GmmGrid(rows=16384, shapes=((64, 2048, 1408), (64, 1408, 2048))),
    'tiny': GmmGrid(rows=256, shapes=((4, 128, 256), (16, 128, 64))),
}
VARIANTS = ('uniform', 'skewed')
TUNE_TILINGS = ((64, 64, 128), (128, 64, 128), (128, 64, 256), (128, 128, 128), (64, 64, 256),
                (256, 64, 128), (128, 128, 64), (64, 128, 128), (128, 32, 128), (128, 32, 256))


def group_sizes(rows: int, groups: int, variant: str, rng: np.random.Generator) -> np.ndarray:
  """int32 [G] summing to rows: equal shares, or a multinomial over Dirichlet(1) probabilities."""
  if variant == 'uniform':
    if rows % groups:
      raise ValueError(f'uniform groups need rows={rows} divisible by groups={groups}')
    return np.full(groups, rows // groups, np.int32)
  return rng.multinomial(rows, rng.dirichlet(np.ones(groups))).astype(np.int32)


@functools.lru_cache(maxsize=1)
def _inputs(m: int, g: int, k: int, n: int, variant: str) -> list[tuple[jax.Array, ...]]:
  """INPUT_SETS sets of (lhs [M,K], rhs [G,K,N], group sizes, cotangent [M,N]); latest kept."""
  rng = np.random.default_rng()
  keys = jax.random.split(kb._fresh_key(), 3 * kb.INPUT_SETS)  # pylint: disable=protected-access
  sets = []
  for i in range(kb.INPUT_SETS):
    lhs = jax.random.normal(keys[3 * i], (m, k), jnp.bfloat16)
    rhs = (jax.random.normal(keys[3 * i + 1], (g, k, n), jnp.float32) * k ** -0.5)
    ct = jax.random.normal(keys[3 * i + 2], (m, n), jnp.bfloat16)
    sizes = jnp.asarray(group_sizes(m, g, variant, rng))
    sets.append((lhs, rhs.astype(jnp.bfloat16), sizes, ct))
  return sets


def _product(impl: str, m: int, g: int, tiling=None):
  """(lhs, rhs, sizes) -> [M, N] for one implementation, float32 accumulation, bf16 out."""
  if impl == 'effjax':
    from effjax.kernels.grouped_matmul import grouped_matmul
    return lambda lhs, rhs, sizes: grouped_matmul(lhs, rhs, sizes, backend='auto', tiling=tiling)
  if impl == 'tokamax':
    tokamax = kb.import_tokamax()
    return lambda lhs, rhs, sizes: tokamax.ragged_dot(lhs, rhs, sizes,
                                                      implementation='mosaic')
  if impl == 'ragged_dot':
    return lambda lhs, rhs, sizes: jax.lax.ragged_dot(lhs, rhs, sizes)

  def einsum(lhs, rhs, sizes):  # every group m / g rows: the sizes are not read
    del sizes
    out = jnp.einsum('gmk,gkn->gmn', lhs.reshape(g, m // g, -1), rhs,
                     preferred_element_type=jnp.float32)
    return out.reshape(m, -1).astype(lhs.dtype)
  return einsum


def _with_mode(product, mode: str):
  if mode == 'fwd':
    return lambda lhs, rhs, sizes, ct: product(lhs, rhs, sizes)

  def fwd_bwd(lhs, rhs, sizes, ct):  # the product too, as training needs it: a product is
    # linear, so its gradients alone do not need it, and XLA drops it unless it is returned
    out, pullback = jax.vjp(lambda a, b: product(a, b, sizes), lhs, rhs)
    return (out, *pullback(ct))
  return fwd_bwd


def _relative_error(got, want) -> float:
  got, want = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
  return float(jnp.linalg.norm(got - want) / jnp.maximum(jnp.linalg.norm(want), 1e-30))


def _check_against_reference(mode: str, tolerance: float = 2e-2):
  """Before timing: the row's outputs (the product, or both gradients) on a fresh input set
  against float32 ragged_dot on the same bf16 values. Recorded as rel_err (the largest
  ||d|| / ||ref|| over the outputs); beyond `tolerance` (bf16 outputs of a float32-accumulated
  product land near 2e-3) the row is still timed but marked check='FAILED', so a wrong result
  is in the table rather than hidden; a non-finite one fails the row."""
  reference = _with_mode(
      lambda a, b, s: jax.lax.ragged_dot(a, b, s, precision=jax.lax.Precision.HIGHEST), mode)
  upcast = lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x

  def check(fn, input_sets):
    got = jax.jit(fn)(*input_sets[0])
    want = jax.jit(reference)(*map(upcast, input_sets[0]))
    errors = [_relative_error(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
    if not all(np.isfinite(errors)):
      raise AssertionError(f'non-finite result: relative errors {errors}')
    worst = max(errors)
    return {'rel_err': worst, **({'check': 'FAILED'} if worst > tolerance else {})}
  return check


def _effjax_info(m: int, k: int, n: int) -> dict[str, Any]:
  from effjax.kernels import grouped_matmul as gm
  backend = gm.resolve_backend('auto')
  info: dict[str, Any] = {'backend': backend}
  if backend != 'ragged_dot':
    info['tiling'] = list(gm.default_tiling(backend, m, k, n))
  return info


def gmm_case(impl: str, mode: str, variant: str, *, rows: int, groups: int, k: int,
             n: int, tiling=None) -> kb.Case:
  group = f'M={rows} G={groups} K={k} N={n}'
  info: dict[str, Any] = {'rows': rows, 'groups': groups, 'k': k, 'n': n, 'dtype': 'bfloat16'}
  if impl == 'effjax':
    info.update(_effjax_info(rows, k, n))
    if tiling is not None:
      info['tiling'] = list(tiling)
  skip = kb.tokamax_missing() if impl == 'tokamax' else None
  if impl == 'tokamax':
    info['implementation'] = 'mosaic'
  flops = 2.0 * rows * k * n * (3.0 if mode == 'fwd+bwd' else 1.0)
  make = lambda: (_with_mode(_product(impl, rows, groups, tiling), mode),
                  _inputs(rows, groups, k, n, variant))
  name = impl if tiling is None else f'{impl} {",".join(map(str, tiling))}'
  check = _check_against_reference(mode) if impl in ('effjax', 'tokamax') else None
  return kb.Case(group=group, variant=variant, impl=name, mode=mode, useful_flops=flops,
                 make=make, info=info, skip=skip, check=check)


def gmm_cases(grid: str, impls: Sequence[str]) -> Iterator[kb.Case]:
  g = GMM_GRIDS[grid]
  if grid == 'tune':  # effjax's Triton tilings side by side, uniform groups
    for groups, k, n in g.shapes:
      for mode in kb.MODES:
        yield gmm_case('einsum', mode, 'uniform', rows=g.rows, groups=groups, k=k, n=n)
        for tiling in TUNE_TILINGS:
          yield gmm_case('effjax', mode, 'uniform', rows=g.rows, groups=groups, k=k, n=n,
                         tiling=tiling)
    return
  for groups, k, n in g.shapes:
    for variant in VARIANTS:
      for mode in kb.MODES:
        for impl in impls:
          if impl == 'einsum' and variant != 'uniform':
            continue  # one einsum row per shape and mode; the skewed rows compare with it
          yield gmm_case(impl, mode, variant, rows=g.rows, groups=groups, k=k, n=n)


kb.register(kb.Op(name='gmm', impls=('effjax', 'tokamax', 'ragged_dot', 'einsum'),
                  baseline='einsum', grids=('default', 'experts64', 'tune', 'tiny'),
                  cases=gmm_cases, dense_variant='uniform'))
