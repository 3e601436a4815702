"""SwiGLU feed-forward: down(silu(x @ gate) * (x @ up))."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from effjax.models import layers
from effjax.models.registry import FEED_FORWARDS
from effjax.parallel.sharding import constrain


@FEED_FORWARDS.register('mlp')
class SwiGLU(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    prec = layers.Precision.from_config(cfg)
    d, f = cfg.d_model, layers.mlp_dim(cfg)
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    self.w_gate = layers.normal_param(rngs, (d, f), ('embed', 'mlp'), cfg.init_std, prec.param)
    self.w_up = layers.normal_param(rngs, (d, f), ('embed', 'mlp'), cfg.init_std, prec.param)
    self.w_down = layers.normal_param(rngs, (f, d), ('mlp', 'embed'), out_std, prec.param)
    self.compute_dtype = prec.compute

  def __call__(self, x_btd: jax.Array, ctx: layers.Context) -> jax.Array:
    del ctx
    cdt = self.compute_dtype
    gate, up = layers.matmuls(x_btd, [('btd,df->btf', self.w_gate), ('btd,df->btf', self.w_up)],
                              cdt)
    hidden = constrain(jax.nn.silu(gate) * up, ('act_batch', 'act_length', 'act_mlp'))
    y = layers.matmul('btf,fd->btd', hidden, self.w_down, cdt)
    return constrain(y, ('act_batch', 'act_length', 'act_embed'))

  @staticmethod
  def flops_per_token(cfg, seq_len: int) -> float:
    del seq_len
    return 2 * SwiGLU.num_params(cfg)

  @staticmethod
  def num_params(cfg) -> int:
    return 3 * cfg.d_model * layers.mlp_dim(cfg)


@FEED_FORWARDS.register('none')
class NoFeedForward(nnx.Module):
  """No feed-forward at all: Block skips it and its norm (e.g. 'mamba2:none', pure Mamba)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    del cfg, rngs

  def __call__(self, x_btd: jax.Array, ctx: layers.Context) -> jax.Array:
    del ctx
    return jnp.zeros_like(x_btd)

  @staticmethod
  def flops_per_token(cfg, seq_len: int) -> float:
    del cfg, seq_len
    return 0.0

  @staticmethod
  def num_params(cfg) -> int:
    del cfg
    return 0
