"""Softmax attention with grouped-query heads and rotary positions.

The score computation goes through `jax.nn.dot_product_attention`: XLA everywhere, cuDNN's fused
kernel on GPU when the compute dtype allows it. Packed sequences are kept apart with segment ids
(a token attends only to earlier tokens of its own document).
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from effjax.models import layers
from effjax.models.registry import MIXERS
from effjax.models.rope import apply_rope
from effjax.parallel.sharding import constrain

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn')

# cuDNN's fused attention defines only a reverse-mode derivative (a custom VJP around an opaque
# kernel), so forward-mode and second-order derivatives can't pass through it. Code that needs them
# (Sophia-H's Hessian-vector products) traces the model inside `forward_differentiable()`, which
# swaps cuDNN for XLA's attention at trace time; the parameters and the math are the same.
_FORWARD_DIFFERENTIABLE = contextvars.ContextVar('forward_differentiable', default=False)


@contextlib.contextmanager
def forward_differentiable():
  """Within this context (at trace time), attention avoids kernels that only define a VJP."""
  token = _FORWARD_DIFFERENTIABLE.set(True)
  try:
    yield
  finally:
    _FORWARD_DIFFERENTIABLE.reset(token)


def resolve_implementation(requested: str, compute_dtype) -> str:
  """'auto' -> cuDNN on GPU for half-precision compute (its fused kernel needs it), else XLA."""
  if requested != 'auto':
    return requested
  half = jnp.dtype(compute_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return 'cudnn' if jax.default_backend() == 'gpu' and half else 'xla'


def segment_mask(segment_ids_bt: jax.Array) -> jax.Array:
  """[batch, 1, q, k] True where query and key belong to the same (non-padding) segment."""
  same = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
  return (same & (segment_ids_bt[:, None, :] > 0))[:, None]


@MIXERS.register('attention')
class Attention(nnx.Module):
  """Causal grouped-query self-attention: num_kv_heads key/value heads shared by query groups."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    prec = layers.Precision.from_config(cfg)
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, layers.head_dim(cfg)
    std = cfg.init_std
    out_std = std / math.sqrt(2 * cfg.num_layers)  # residual branches summed over depth
    self.wq = layers.normal_param(rngs, (d, n, h), ('embed', 'heads', 'head_dim'), std, prec.param)
    self.wk = layers.normal_param(rngs, (d, k, h), ('embed', 'kv_heads', 'head_dim'), std, prec.param)
    self.wv = layers.normal_param(rngs, (d, k, h), ('embed', 'kv_heads', 'head_dim'), std, prec.param)
    self.wo = layers.normal_param(rngs, (n, h, d), ('heads', 'head_dim', 'embed'), out_std,
                                  prec.param)
    self.rope_theta = cfg.rope_theta
    self.compute_dtype = prec.compute
    self.implementation = resolve_implementation(cfg.attention_impl, prec.compute)

  def __call__(self, x_btd: jax.Array, ctx: layers.Context) -> jax.Array:
    cdt = self.compute_dtype
    q = jnp.einsum('btd,dnh->btnh', x_btd, self.wq[...].astype(cdt))
    k = jnp.einsum('btd,dkh->btkh', x_btd, self.wk[...].astype(cdt))
    v = jnp.einsum('btd,dkh->btkh', x_btd, self.wv[...].astype(cdt))
    q = constrain(apply_rope(q, ctx.positions, self.rope_theta),
                  ('act_batch', 'act_length', 'act_heads', None))
    k = constrain(apply_rope(k, ctx.positions, self.rope_theta),
                  ('act_batch', 'act_length', 'act_kv_heads', None))
    v = constrain(v, ('act_batch', 'act_length', 'act_kv_heads', None))
    mask = None if ctx.segment_ids is None else segment_mask(ctx.segment_ids)
    impl = 'xla' if _FORWARD_DIFFERENTIABLE.get() else self.implementation
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=impl)
    out = checkpoint_name(out, 'attention_out')
    y = jnp.einsum('btnh,nhd->btd', out, self.wo[...].astype(cdt))
    return constrain(y, ('act_batch', 'act_length', 'act_embed'))

  @staticmethod
  def flops_per_token(cfg, seq_len: int) -> float:
    """Forward FLOPs per token: projections 2*params, scores and values 2*2*T*n*h at half (causal)."""
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, layers.head_dim(cfg)
    projections = 2 * d * h * (2 * n + 2 * k)
    scores_and_values = 0.5 * 4 * seq_len * n * h
    return projections + scores_and_values

  @staticmethod
  def num_params(cfg) -> int:
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, layers.head_dim(cfg)
    return d * h * (2 * n + 2 * k)
