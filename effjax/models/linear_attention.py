"""Linear-attention mixers: gated linear attention, retention and kernelised linear attention.

One module, three kinds, all of them the decayed recurrence of effjax.kernels.chunked_scan,
S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = q_t^T S_t, per head with a [head_dim, head_dim] state:

  'gla'               gated linear attention: g_t = logsigmoid(x_t W_g + b_g) / tau per head, a
                      data-dependent decay (tau = model.gla_gate_temperature keeps early decays
                      slow); q . k scaled by 1/sqrt(K);
  'retnet'            retention: a fixed decay per head, gamma_h = 1 - 2^(-5 - h), and rotary
                      positions on q and k (RetNet's xPos without its length extrapolation term);
  'linear_attention'  no decay, the elu + 1 feature map on q and k and the normalised output
                      phi(q_t)^T S_t / (phi(q_t)^T z_t + eps), z_t = the sum of phi(k_j) so far.
'gla' and 'retnet' normalise each head's output with an RMSNorm and gate it with swish(x W_r)
before the output projection, as both papers do; the plain kind has neither.

Training runs the chunked form (model.scan_backend: Pallas on GPU and TPU, the chunked steps in
plain JAX elsewhere; model.scan_chunk tokens per chunk, 0 = the backend's default); decoding
carries the recurrent state, O(1) in the context length: `init_cache` allocates [B, H, K, V]
float32 (and z [B, H, K] for the plain kind), `prefill` runs the chunked form on the prompt and
keeps its final state, `decode` advances one token. Packed documents reset the state (segment
ids). Under a mesh the Pallas backends run inside jax.shard_map with batch and heads split; the
sequence stays whole per device (see effjax/kernels/chunked_scan/chunked.py for how the
inter-chunk state passing extends to a sequence axis).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from effjax.kernels import chunked_scan as cs
from effjax.models import attention as _attention
from effjax.models import layers
from effjax.models.norms import RMSNorm
from effjax.models.registry import MIXERS
from effjax.models.rope import apply_rope
from effjax.parallel.sharding import constrain, map_per_device

BACKENDS = cs.BACKENDS  # model.scan_backend
KINDS = ('gla', 'retnet', 'linear_attention')
ACT_BTHD = ('act_batch', 'act_length', 'act_heads', None)
_EPS = 1e-6


def retention_log_decays(num_heads: int) -> jnp.ndarray:
  """RetNet's fixed per-head log-decays log(1 - 2^(-5 - h)), float32 [H]."""
  return jnp.log1p(-jnp.exp2(-5.0 - jnp.arange(num_heads, dtype=jnp.float32)))


def scan_op(q, k, v, g, segment_ids, *, backend: str, chunk: int, interpret: bool,
            scale: float, initial_state=None, return_final_state: bool = False):
  """chunked_scan with the model's backend, chunk (0 = default) and interpret settings, run
  per device under a mesh when the backend is a Pallas kernel.

  Inside `attention.forward_differentiable()` (Sophia-H's Hessian-vector products) the op runs
  its 'reference' backend, the only one with a forward-mode derivative.
  """
  backend = 'reference' if _attention.forward_differentiable_active() else backend
  kwargs = dict(scale=scale, chunk_size=chunk or None, backend=backend, interpret=interpret,
                return_final_state=return_final_state)

  def op(q, k, v, g, seg, init):
    return cs.chunked_scan(q, k, v, g, segment_ids=seg, initial_state=init, **kwargs)

  if cs.resolve_backend(backend) in ('xla', 'reference'):
    return op(q, k, v, g, segment_ids, initial_state)  # plain JAX: XLA partitions it
  # The length dimension is never split here: a shard of the sequence would start from a zero
  # state (chunked.py says how a sequence axis would pass states instead).
  bthd = ('act_batch', None, 'act_heads', None)
  seg_names = None if segment_ids is None else ('act_batch', None)
  init_names = None if initial_state is None else ('act_batch', 'act_heads', None, None)
  out_names = (bthd, ('act_batch', 'act_heads', None, None)) if return_final_state else bthd
  return map_per_device(op, (q, k, v, g, segment_ids, initial_state),
                        (bthd, bthd, bthd, ('act_batch', None, 'act_heads'), seg_names,
                         init_names), out_names)


class LinearAttention(nnx.Module):
  """Multi-head decayed linear attention; `kind` picks the decay, feature map and output path."""
  kind = 'gla'

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    prec = layers.Precision.from_config(cfg)
    d, n, h = cfg.d_model, cfg.num_heads, layers.head_dim(cfg)
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.num_layers)
    names = ('embed', 'heads', 'head_dim')
    self.wq = layers.normal_param(rngs, (d, n, h), names, std, prec.param)
    self.wk = layers.normal_param(rngs, (d, n, h), names, std, prec.param)
    self.wv = layers.normal_param(rngs, (d, n, h), names, std, prec.param)
    self.wo = layers.normal_param(rngs, (n, h, d), ('heads', 'head_dim', 'embed'), out_std,
                                  prec.param)
    if self.kind == 'gla':
      self.w_gate = layers.normal_param(rngs, (d, n), ('embed', 'heads'), std, prec.param)
      # Zero bias, as in GLA: logsigmoid(0) / 16 = -0.043, a half-life of about 16 tokens for
      # an average token, spread by the data-dependent part.
      self.gate_bias = nnx.Param(jnp.zeros((n,), jnp.float32), out_sharding=('heads',),
                                 eager_sharding=False)
    if self.kind in ('gla', 'retnet'):
      self.w_out_gate = layers.normal_param(rngs, (d, n, h), names, std, prec.param)
      self.out_norm = RMSNorm(h, eps=cfg.norm_eps, param_dtype=prec.param,
                              compute_dtype=prec.compute)
    self.scan = dict(backend=cfg.scan_backend, chunk=cfg.scan_chunk,
                     interpret=cfg.scan_interpret)
    self.num_heads, self.head_dim = n, h
    self.rope_theta = cfg.rope_theta
    self.gate_temperature = cfg.gla_gate_temperature
    self.compute_dtype = prec.compute

  # ---------------------------------------------------------------- pieces

  def _project(self, x_btd: jax.Array, positions_bt: jax.Array):
    """(q, k, v [B, T, H, D] in the compute dtype, log-decay [B, T, H] float32)."""
    cdt = self.compute_dtype
    q, k, v = layers.matmuls(x_btd, [('btd,dnh->btnh', self.wq), ('btd,dnh->btnh', self.wk),
                                     ('btd,dnh->btnh', self.wv)], cdt)
    b, t = x_btd.shape[:2]
    if self.kind == 'gla':
      logits = layers.matmul('btd,dn->btn', x_btd.astype(jnp.float32), self.w_gate,
                             jnp.float32)
      g = jax.nn.log_sigmoid(logits + self.gate_bias[...]) / self.gate_temperature
    elif self.kind == 'retnet':
      q, k = apply_rope(q, positions_bt, self.rope_theta), apply_rope(k, positions_bt,
                                                                     self.rope_theta)
      g = jnp.broadcast_to(retention_log_decays(self.num_heads), (b, t, self.num_heads))
    else:
      q, k = (jax.nn.elu(x.astype(jnp.float32)) + 1.0 for x in (q, k))
      q, k = q.astype(cdt), k.astype(cdt)
      g = jnp.zeros((b, t, self.num_heads), jnp.float32)
    q, k, v = (constrain(x, ACT_BTHD) for x in (q, k, v))
    return q, k, v, g

  @property
  def scale(self) -> float:
    return 1.0 if self.kind == 'linear_attention' else self.head_dim ** -0.5

  def _finish(self, o_bthv: jax.Array, x_btd: jax.Array, denominator_bth=None) -> jax.Array:
    """Normalise and gate each head's output, then project back to the residual stream."""
    cdt = self.compute_dtype
    if self.kind == 'linear_attention':
      o_bthv = (o_bthv.astype(jnp.float32) / (denominator_bth[..., None] + _EPS)).astype(cdt)
    else:
      gate = layers.matmul('btd,dnh->btnh', x_btd, self.w_out_gate, cdt)
      o_bthv = self.out_norm(o_bthv) * jax.nn.silu(gate)
    o_bthv = constrain(o_bthv.astype(cdt), ACT_BTHD)
    y = layers.matmul('btnh,nhd->btd', o_bthv, self.wo, cdt)
    return constrain(y, ('act_batch', 'act_length', 'act_embed'))

  @staticmethod
  def _denominator(q, k, segment_ids, z0=None):
    """phi(q_t) . z_t with z_t the sum of phi(k_j) of the document so far (+ z0 before a reset)."""
    k32 = k.astype(jnp.float32)
    if segment_ids is None:
      z = jnp.cumsum(k32, axis=1)
      carried = jnp.ones(k.shape[:2], bool)
    else:  # a segmented cumulative sum: restarts at every document start
      reset = cs.reference.resets(segment_ids, *segment_ids.shape)[..., None, None]

      def combine(a, b):
        return a[0] | b[0], jnp.where(b[0], b[1], a[1] + b[1])

      _, z = jax.lax.associative_scan(combine, (jnp.broadcast_to(reset, k32.shape), k32), axis=1)
      carried = jnp.cumsum(reset[..., 0, 0], axis=1) == 0
    if z0 is not None:
      z = z + jnp.where(carried[..., None, None], z0[:, None], 0.0)
    return jnp.sum(q.astype(jnp.float32) * z, axis=-1), z[:, -1]

  # ---------------------------------------------------------------- forward

  def __call__(self, x_btd: jax.Array, ctx: layers.Context) -> jax.Array:
    q, k, v, g = self._project(x_btd, ctx.positions)
    o = scan_op(q, k, v, g, ctx.segment_ids, **self.scan, scale=self.scale)
    den = (self._denominator(q, k, ctx.segment_ids)[0] if self.kind == 'linear_attention'
           else None)
    return self._finish(o, x_btd, den)

  # ---------------------------------------------------------------- decoding

  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
    """The recurrent state: its size does not depend on max_len."""
    del max_len, dtype  # the state is float32 whatever the compute dtype
    n, h = self.num_heads, self.head_dim
    cache = {'state': jnp.zeros((batch, n, h, h), jnp.float32)}
    if self.kind == 'linear_attention':
      cache['z'] = jnp.zeros((batch, n, h), jnp.float32)
    return cache

  def prefill(self, x_btd: jax.Array, ctx: layers.Context, cache):
    q, k, v, g = self._project(x_btd, ctx.positions)
    o, state = scan_op(q, k, v, g, ctx.segment_ids, **self.scan, scale=self.scale,
                       initial_state=cache['state'], return_final_state=True)
    new = {'state': state}
    den = None
    if self.kind == 'linear_attention':
      den, new['z'] = self._denominator(q, k, ctx.segment_ids, cache['z'])
    return self._finish(o, x_btd, den), new

  def decode(self, x_b1d: jax.Array, position: jax.Array, cache):
    b = x_b1d.shape[0]
    positions = jnp.full((b, 1), jnp.asarray(position, jnp.int32))
    q, k, v, g = self._project(x_b1d, positions)
    o, state = cs.recurrent_step(cache['state'], q[:, 0], k[:, 0], v[:, 0], g[:, 0],
                                 scale=self.scale)
    new = {'state': state}
    den = None
    if self.kind == 'linear_attention':
      new['z'] = cache['z'] + k[:, 0].astype(jnp.float32)
      den = jnp.sum(q[:, 0].astype(jnp.float32) * new['z'], axis=-1)[:, None]
    return self._finish(o[:, None].astype(self.compute_dtype), x_b1d, den), new

  # ---------------------------------------------------------------- accounting

  @classmethod
  def num_params(cls, cfg) -> int:
    d, n, h = cfg.d_model, cfg.num_heads, layers.head_dim(cfg)
    total = 4 * d * n * h
    if cls.kind == 'gla':
      total += d * n + n
    if cls.kind in ('gla', 'retnet'):
      total += d * n * h + h
    return total

  @classmethod
  def flops_per_token(cls, cfg, seq_len: int) -> float:
    """Projections (2 per weight), plus per head the chunked form's matmuls per token: the
    intra-chunk scores and values at half (causal within the chunk, 2*C*K + 2*C*V halved), the
    state update k^T v (2*K*V) and the inter-chunk read q S (2*K*V). Linear in seq_len."""
    n, h = cfg.num_heads, layers.head_dim(cfg)
    chunk = cfg.scan_chunk or cs.default_chunk(cfg.scan_backend)
    chunk = min(chunk, max(seq_len, 1))
    projections = 2 * (4 * cfg.d_model * n * h +
                       (cfg.d_model * n * h if cls.kind in ('gla', 'retnet') else 0) +
                       (cfg.d_model * n if cls.kind == 'gla' else 0))
    return projections + n * (chunk * 2 * h + 4 * h * h)


@MIXERS.register('gla')
class GatedLinearAttention(LinearAttention):
  """Data-dependent per-head decay."""
  kind = 'gla'


@MIXERS.register('retnet')
class Retention(LinearAttention):
  """Fixed per-head decay (RetNet)."""
  kind = 'retnet'


@MIXERS.register('linear_attention')
class KernelLinearAttention(LinearAttention):
  """No decay, elu + 1 features, normalised output."""
  kind = 'linear_attention'
