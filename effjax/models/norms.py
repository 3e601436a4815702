"""RMSNorm, computed in float32 whatever the compute dtype."""

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, *, eps: float, param_dtype, compute_dtype):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=('norm',),
                           eager_sharding=False)
    self.eps = eps
    self.compute_dtype = compute_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.compute_dtype)
