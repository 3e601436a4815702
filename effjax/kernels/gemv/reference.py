"""What the output-major GEMV computes, in plain JAX.

  x_row  [1, K]  one row (a batch-1 decoding step's activations), any float dtype;
  w      [N, K]  a float weight stored output-major (its rows are the output channels).

x_row @ w.T -> [1, N]: the products accumulated in float32, the result in x's dtype. The kernel
sums in another order (K in tiles, then the tile), so it agrees up to float32 rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gemv_nk_reference(x_row: jax.Array, w_nk: jax.Array) -> jax.Array:
  return jnp.matmul(x_row, w_nk.T.astype(x_row.dtype),
                    preferred_element_type=jnp.float32).astype(x_row.dtype)
