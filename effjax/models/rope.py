"""Rotary position embeddings (rotate-half form), from explicit per-token positions.

Positions restart at 0 in every packed segment, so a document sees the same encoding packed or
alone.
"""

import jax
import jax.numpy as jnp


def apply_rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
  head_dim = x_btnh.shape[-1]
  half = head_dim // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles_bth = positions_bt[..., None].astype(jnp.float32) * inv_freq
  sin = jnp.sin(angles_bth)[:, :, None, :]
  cos = jnp.cos(angles_bth)[:, :, None, :]
  x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_btnh.dtype)
