"""Shared pieces of every layer: the mixed-precision policy and annotated parameter creation."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Precision:
  """Parameters are stored in `param`, matmuls run in `compute`, logits come out in `output`."""
  param: Any
  compute: Any
  output: Any

  @classmethod
  def from_config(cls, model_cfg) -> 'Precision':
    return cls(jnp.dtype(model_cfg.param_dtype), jnp.dtype(model_cfg.compute_dtype),
               jnp.dtype(model_cfg.output_dtype))


def normal_param(rngs: nnx.Rngs, shape: Sequence[int], names: Sequence[str], std: float,
                 dtype) -> nnx.Param:
  """A normally initialised parameter carrying its logical axis names.

  Sharding is applied by the caller from these names (jit out_shardings), never eagerly here, so
  a model file never depends on the mesh.
  """
  assert len(shape) == len(names), (shape, names)
  value = std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)
  return nnx.Param(value.astype(dtype), out_sharding=tuple(names), eager_sharding=False)


@dataclasses.dataclass(frozen=True)
class Context:
  """Per-call inputs every mixer may need (a pytree-free bundle passed down the stack)."""
  positions: jax.Array  # [batch, length] int32, restart at 0 in each packed segment
  segment_ids: jax.Array | None  # [batch, length] int32, 0 = padding; None = one unpadded document


def head_dim(model_cfg) -> int:
  return model_cfg.head_dim or model_cfg.d_model // model_cfg.num_heads


def mlp_dim(model_cfg) -> int:
  if model_cfg.mlp_dim:
    return model_cfg.mlp_dim
  return -(-(8 * model_cfg.d_model // 3) // 64) * 64


class Folded:
  """An RMS-normalised input left unnormalised: the raw x (in the norm's compute dtype) and its
  factor r = rsqrt(mean(x^2) + eps) [..., 1] in float32. `matmul` takes x times the weight and
  scales the product's rows by r: RMSNorm(x) @ W with the norm's gain already folded into W (the
  decoding engine's infer.fold_norms), so no normalised copy of x is written before the product.
  Only `matmul` / `matmuls` and `.shape` accept it."""

  def __init__(self, x: jax.Array, eps: float, dtype):
    x32 = x.astype(jnp.float32)
    self.r = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    self.x = x.astype(dtype)

  @property
  def shape(self):
    return self.x.shape


def matmul(equation: str, x: jax.Array, weight: Any, dtype) -> jax.Array:
  """x times a projection weight in `dtype`: jnp.einsum(equation, x, weight[...] as dtype).

  A compressed weight (effjax.compress.weights: quantized, low-rank, LoRA) brings its own
  `einsum` and computes the product its way; a plain parameter is read and cast. A `Folded` x:
  the product of its raw x, each output row scaled by its r (the equation's output must start
  with x's leading letters).
  """
  if isinstance(x, Folded):
    lhs, out = equation.split('->')
    lead = lhs.split(',')[0][:-1]
    if not out.startswith(lead):
      raise ValueError(f'a folded norm\'s input needs an output that keeps its leading axes '
                       f'({lead!r}); got {equation!r}')
    if hasattr(type(weight), 'einsum'):
      y = weight.einsum(equation, x.x, dtype)
    else:  # kept in float32 until scaled: one rounding to dtype, as the normalised product has
      y = jnp.einsum(equation, x.x, weight[...].astype(dtype), preferred_element_type=jnp.float32)
    r = x.r.reshape(x.r.shape[:-1] + (1,) * (y.ndim - len(lead)))
    return (y.astype(jnp.float32) * r).astype(dtype)
  if hasattr(type(weight), 'einsum'):
    return weight.einsum(equation, x, dtype)
  return jnp.einsum(equation, x, weight[...].astype(dtype))


def matmuls(x: jax.Array, products, dtype) -> list[jax.Array]:
  """[matmul(equation, x, weight, dtype) for (equation, weight) in products]: several
  projections of one input (attention's q, k, v; SwiGLU's gate, up). Where the weights' type
  computes such a group itself (`einsum_group`: int8 / int4 weights read by one kernel launch)
  it does; otherwise each product is taken on its own."""
  group = getattr(type(products[0][1]), 'einsum_group', None)
  if group is not None and len(products) > 1 and not isinstance(x, Folded):
    ys = group(products, x, dtype)
    if ys is not None:
      return ys
  return [matmul(equation, x, weight, dtype) for equation, weight in products]
