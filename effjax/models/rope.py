"""Rotary position embeddings (rotate-half form), from explicit per-token positions.

Positions restart at 0 in every packed segment, so a document sees the same encoding packed or
alone.
"""

import jax
import jax.numpy as jnp


def rope_tables(positions_bt: jax.Array, head_dim: int,
                theta: float) -> tuple[jax.Array, jax.Array]:
  """(cos, sin) [B, T, head_dim / 2] float32 of the positions' rotation angles."""
  half = head_dim // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles_bth = positions_bt[..., None].astype(jnp.float32) * inv_freq
  return jnp.cos(angles_bth), jnp.sin(angles_bth)


def rotate(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
  """x rotated by the tables of `rope_tables` (in float32, back in x's dtype)."""
  sin = sin_bth[:, :, None, :]
  cos = cos_bth[:, :, None, :]
  x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_btnh.dtype)


def apply_rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
  return rotate(x_btnh, *rope_tables(positions_bt, x_btnh.shape[-1], theta))
