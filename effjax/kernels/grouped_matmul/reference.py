"""The grouped matmul's specification: what every kernel backend must reproduce.

Rows of lhs [M, K] are sorted by group: group g owns rows [offset_g, offset_g + group_sizes[g]),
offset_g = sum(group_sizes[:g]). Groups may be empty and need not fill lhs: rows past
sum(group_sizes) belong to no group.

  gmm   out [M, N]:    out[r] = lhs[r] @ rhs[g(r)], rhs [G, K, N]; rows of no group give 0.
  tgmm  out [G, K, N]: out[g] = lhs[rows of g]^T @ rhs[rows of g], rhs [M, N]; 0 for empty groups.

tgmm is gmm's weight gradient (and the transpose of gmm in its rhs argument). Both are XLA's
ragged dot, which is why XLA is the reference: gmm is `jax.lax.ragged_dot`, tgmm the ragged dot
whose ragged dimension is the contracted one. The functions multiply at HIGHEST precision by
default (exact float32 on every platform); the op's 'ragged_dot' backend passes precision=None,
the platform's default like any other XLA matmul.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST

# tgmm as a ragged dot: contract the (ragged) row dimension of both operands, rows split by group.
_TGMM_DIMS = jax.lax.RaggedDotDimensionNumbers(
  dot_dimension_numbers=(((0,), (0,)), ((), ())),
  lhs_ragged_dimensions=[0],
  rhs_group_dimensions=[],
)


def gmm_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                  preferred_element_type=None, precision=_HIGHEST) -> jax.Array:
  """lhs [M, K] (rows sorted by group) x rhs [G, K, N] -> [M, N]; rows past the groups are 0."""
  return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), precision=precision,
                            preferred_element_type=preferred_element_type)


def tgmm_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                   preferred_element_type=None, precision=_HIGHEST) -> jax.Array:
  """lhs [M, K], rhs [M, N] -> [G, K, N]: per group, lhs[rows]^T @ rhs[rows]."""
  return jax.lax.ragged_dot_general(lhs, rhs, group_sizes.astype(jnp.int32), _TGMM_DIMS,
                                    precision=precision,
                                    preferred_element_type=preferred_element_type)
