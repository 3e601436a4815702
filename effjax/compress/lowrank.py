"""Low-rank factorization: each chosen projection W [inputs, outputs] becomes U [inputs, k] @
V [k, outputs] from its SVD, k chosen so the kept singular values hold a fraction of the energy.

The energy of rank k is sum_{i<k} s_i^2 / sum_i s_i^2 (the share of ||W||_F^2 the truncation
keeps). Layers of a scanned stack must share one shape, so one rank serves every layer (and
expert) of a projection: the largest any of them needs. The singular values are split evenly
(U sqrt(S), sqrt(S) V) so both factors have the same scale for fine-tuning.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from effjax.compress import weights as w_lib


def _matrix_shape(w: jax.Array, layout) -> tuple[int, int, int]:
  """(matrices, inputs, outputs): w's batch axes (layers, experts) and its inputs / outputs
  flattened to one axis each."""
  nb = layout.batch
  inputs = int(np.prod(w.shape[nb:nb + layout.inputs]))
  return int(np.prod(w.shape[:nb])), inputs, int(np.prod(w.shape[nb + layout.inputs:]))


@jax.jit
def _singular_values(m: jax.Array) -> jax.Array:
  return jnp.linalg.svd(m.astype(jnp.float32), compute_uv=False)


def rank_for_energy(w: jax.Array, layout, energy: float) -> int:
  """The smallest rank keeping `energy` of every layer's squared singular values.

  The singular values of every layer are computed together on w's device (they were 112 host
  SVDs one at a time on the 1B model, whose SVD row took 313 s against 84-94 s for the other
  fine-tuned techniques); the energy sums run in float64 on the host.
  """
  if not 0.0 < energy <= 1.0:
    raise ValueError(f'compress.lowrank_energy={energy}: must be in (0, 1]')
  shape = _matrix_shape(w, layout)
  s = np.asarray(jax.device_get(_singular_values(jnp.reshape(w, shape))), np.float64)
  s2 = s ** 2
  cumulative = np.cumsum(s2, axis=-1) / np.maximum(s2.sum(axis=-1, keepdims=True), 1e-30)
  ranks = [int(np.searchsorted(c, energy - 1e-9) + 1) for c in cumulative]
  return min(max([1] + ranks), min(shape[1:]))


@functools.partial(jax.jit, static_argnames=('layout', 'rank'))
def factor(w: jax.Array, layout, rank: int) -> tuple[jax.Array, jax.Array]:
  """(u [batch..., inputs..., rank], v [batch..., rank, outputs...]) with u @ v ~ w."""
  nb = layout.batch
  inputs = int(np.prod(w.shape[nb:nb + layout.inputs]))
  m = jnp.reshape(w.astype(jnp.float32), (-1, inputs, int(np.prod(w.shape[nb + layout.inputs:]))))
  u, s, vt = jnp.linalg.svd(m, full_matrices=False)
  root = jnp.sqrt(s[:, :rank])
  u = u[:, :, :rank] * root[:, None, :]
  v = root[:, :, None] * vt[:, :rank, :]
  batch, ins, outs = w.shape[:nb], w.shape[nb:nb + layout.inputs], w.shape[nb + layout.inputs:]
  return u.reshape(batch + ins + (rank,)), v.reshape(batch + (rank,) + outs)


def choose_ranks(model, compress_cfg) -> dict[str, int]:
  """{projection name: rank} for the targets of a dense model, by compress.lowrank_energy."""
  ranks: dict[str, int] = {}
  for _, module, name in w_lib.find_targets(model, w_lib.target_names(compress_cfg)):
    param = vars(module)[name]
    rank = rank_for_energy(param[...], w_lib.layout_of(w_lib._names(param)),
                           compress_cfg.lowrank_energy)
    ranks[name] = max(ranks.get(name, 0), rank)
  return ranks
