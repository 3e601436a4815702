"""State-space mixers: Mamba-2 (SSD, through the chunked-scan op) and Mamba-1 (selective scan).

'mamba2' (Dao & Gu 2024). Width E = model.ssm_expand * d_model split into H = E / P heads of
P = model.ssm_head_dim channels; state N = model.ssm_state_dim; one group (B and C shared by the
heads). x -> z, x, B, C, dt by linear maps; a short causal depthwise convolution
(model.ssm_conv_width taps) and SiLU on x, B and C; dt = softplus(. + dt_bias) per head;
A = -exp(a_log) a scalar per head (A times the identity). The SSD recurrence

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T        [N, P] per head
    y_t = C_t^T h_t + D x_t

is decayed linear attention with q = C, k = B, v = dt * x and log-decay dt * A, so training runs
effjax.kernels.chunked_scan (chunked matrix form; Pallas on GPU and TPU), then
y = RMSNorm(y * silu(z)) and the output projection.

'mamba1' (Gu & Dao 2023). Width E channels, a diagonal A [E, N] (S4D-real init), dt from a rank-R
bottleneck (model.ssm_dt_rank, 0 = ceil(d_model / 16)), B and C [N] from x. The selective scan

    h_t = exp(dt_t A) * h_{t-1} + (dt_t x_t) B_t      [E, N], elementwise decays
    y_t = h_t C_t + D x_t

has a decay per channel and state entry, which no matmul-shaped kernel serves well; it runs in
plain JAX as a chunked parallel scan: an associative scan within each chunk of model.scan_chunk
tokens (0 = 64), a sequential carry between chunks, each chunk rematerialised in the backward
pass so activations stay O(T * E) rather than O(T * E * N).

Both reset their state and convolution history at document boundaries (segment ids). Decoding
carries a fixed-size state whatever the context length: the SSM state (float32; [B, H, N, P] or
[B, E, N]) and the last conv_width - 1 convolution inputs.

Parameter names a_log, d_skip and *_bias are kept out of weight decay (effjax.optim.factory), as
Mamba's own training does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from effjax.kernels import chunked_scan as cs
from effjax.models import layers
from effjax.models.linear_attention import scan_op
from effjax.models.norms import RMSNorm
from effjax.models.registry import MIXERS
from effjax.parallel.sharding import constrain

_DT_MIN, _DT_MAX = 1e-3, 1e-1  # the initial range of dt, log-uniform (both papers)


def _param(value, names) -> nnx.Param:
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def _uniform_param(rngs: nnx.Rngs, shape, names, bound: float, dtype) -> nnx.Param:
  """U(-bound, bound): the convolution taps (a depthwise Conv1d's default, fan-in = the taps)
  and Mamba-1's dt projection (its 'random' init), as the reference implementations draw them."""
  value = jax.random.uniform(rngs.params(), tuple(shape), jnp.float32, -bound, bound)
  return _param(value.astype(dtype), names)


def _dt_bias(rngs: nnx.Rngs, shape) -> jax.Array:
  """softplus^-1 of dt drawn log-uniformly from [_DT_MIN, _DT_MAX]."""
  u = jax.random.uniform(rngs.params(), shape, jnp.float32)
  dt = jnp.exp(u * (math.log(_DT_MAX) - math.log(_DT_MIN)) + math.log(_DT_MIN))
  return dt + jnp.log(-jnp.expm1(-dt))


# ------------------------------------------------------------------ causal depthwise convolution

def causal_conv(x_btc: jax.Array, w_wc: jax.Array, bias_c: jax.Array,
                segment_ids_bt: jax.Array | None, history_bwc: jax.Array | None = None):
  """y_t = bias + sum_i w[i] x_{t-i} over the same document; returns (y, new history).

  history [B, W - 1, C] holds the inputs before t = 0 (zeros when None); it continues the first
  document only. The new history is the last W - 1 inputs of the last document (zeros where they
  belong to an earlier one), for decoding to continue it.
  """
  b, t, c = x_btc.shape
  width = w_wc.shape[0]
  if history_bwc is None:
    history_bwc = jnp.zeros((b, width - 1, c), x_btc.dtype)
  full = jnp.concatenate([history_bwc.astype(x_btc.dtype), x_btc], axis=1)
  doc = None
  if segment_ids_bt is not None:
    doc = jnp.cumsum(cs.reference.resets(segment_ids_bt, b, t), axis=1)
    doc = jnp.concatenate([jnp.zeros((b, width - 1), doc.dtype), doc], axis=1)
  y = jnp.zeros((b, t, c), jnp.float32) + bias_c.astype(jnp.float32)
  for i in range(width):  # tap i reads x_{t-i}
    shifted = full[:, width - 1 - i:width - 1 - i + t]
    if doc is not None:
      same = doc[:, width - 1 - i:width - 1 - i + t] == doc[:, width - 1:]
      shifted = jnp.where(same[..., None], shifted, 0)
    y = y + shifted.astype(jnp.float32) * w_wc[i].astype(jnp.float32)
  history = full[:, t:]
  if doc is not None:  # decoding continues the last document: earlier documents' inputs are gone
    history = jnp.where((doc[:, t:] == doc[:, -1:])[..., None], history, 0)
  return y.astype(x_btc.dtype), history


def conv_step(x_bc: jax.Array, w_wc: jax.Array, bias_c: jax.Array, history_bwc: jax.Array):
  """One token of causal_conv: (y [B, C], new history)."""
  window = jnp.concatenate([history_bwc.astype(x_bc.dtype), x_bc[:, None]], axis=1)  # oldest first
  y = jnp.einsum('bwc,wc->bc', window.astype(jnp.float32),
                 jnp.flip(w_wc, 0).astype(jnp.float32)) + bias_c.astype(jnp.float32)
  return y.astype(x_bc.dtype), window[:, 1:]


# ------------------------------------------------------------------ Mamba-2

@MIXERS.register('mamba2')
class Mamba2(nnx.Module):
  """Mamba-2 mixer (SSD); see the module docstring."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    prec = layers.Precision.from_config(cfg)
    d, n, p, w = cfg.d_model, cfg.ssm_state_dim, cfg.ssm_head_dim, cfg.ssm_conv_width
    e = cfg.ssm_expand * d
    h = e // p
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.num_layers)
    hp = ('embed', 'heads', 'head_dim')
    self.w_z = layers.normal_param(rngs, (d, h, p), hp, std, prec.param)
    self.w_x = layers.normal_param(rngs, (d, h, p), hp, std, prec.param)
    self.w_b = layers.normal_param(rngs, (d, n), ('embed', 'state'), std, prec.param)
    self.w_c = layers.normal_param(rngs, (d, n), ('embed', 'state'), std, prec.param)
    self.w_dt = layers.normal_param(rngs, (d, h), ('embed', 'heads'), std, prec.param)
    bound = 1.0 / math.sqrt(w)
    self.conv_x = _uniform_param(rngs, (w, h, p), ('conv', 'heads', 'head_dim'), bound,
                                 prec.param)
    self.conv_b = _uniform_param(rngs, (w, n), ('conv', 'state'), bound, prec.param)
    self.conv_c = _uniform_param(rngs, (w, n), ('conv', 'state'), bound, prec.param)
    self.conv_x_bias = _param(jnp.zeros((h, p), prec.param), ('heads', 'head_dim'))
    self.conv_b_bias = _param(jnp.zeros((n,), prec.param), ('state',))
    self.conv_c_bias = _param(jnp.zeros((n,), prec.param), ('state',))
    self.dt_bias = _param(_dt_bias(rngs, (h,)), ('heads',))
    a = jax.random.uniform(rngs.params(), (h,), jnp.float32, 1.0, 16.0)
    self.a_log = _param(jnp.log(a), ('heads',))
    self.d_skip = _param(jnp.ones((h,), jnp.float32), ('heads',))
    # Normalised per head (a grouped RMSNorm, the tensor-parallel form of Mamba-2's gated norm).
    self.norm = RMSNorm(p, eps=cfg.norm_eps, param_dtype=prec.param, compute_dtype=prec.compute)
    self.w_out = layers.normal_param(rngs, (h, p, d), ('heads', 'head_dim', 'embed'), out_std,
                                     prec.param)
    self.scan = dict(backend=cfg.scan_backend, chunk=cfg.scan_chunk,
                     interpret=cfg.scan_interpret)
    self.num_heads, self.head_dim, self.state_dim, self.conv_width = h, p, n, w
    self.compute_dtype = prec.compute

  def _inputs(self, x_btd, segment_ids, conv_cache=None):
    """(z, x, B, C [compute dtype], dt, log-decay [float32], new conv history)."""
    cdt = self.compute_dtype
    b, t, _ = x_btd.shape
    h, p, n = self.num_heads, self.head_dim, self.state_dim
    z, xs, bs, c_s = layers.matmuls(x_btd, [('btd,dhp->bthp', self.w_z),
                                            ('btd,dhp->bthp', self.w_x),
                                            ('btd,dn->btn', self.w_b), ('btd,dn->btn', self.w_c)],
                                    cdt)
    xs = xs.reshape(b, t, h * p)
    xbc = jnp.concatenate([xs, bs, c_s], axis=-1)
    w = jnp.concatenate([self.conv_x[...].reshape(self.conv_width, h * p), self.conv_b[...],
                         self.conv_c[...]], axis=-1)
    bias = jnp.concatenate([self.conv_x_bias[...].reshape(h * p), self.conv_b_bias[...],
                            self.conv_c_bias[...]])
    if t == 1 and conv_cache is not None:
      y, history = conv_step(xbc[:, 0], w, bias, conv_cache)
      y = y[:, None]
    else:
      y, history = causal_conv(xbc, w, bias, segment_ids, conv_cache)
    y = jax.nn.silu(y)
    xs, bs, c_s = y[..., :h * p].reshape(b, t, h, p), y[..., h * p:h * p + n], y[..., h * p + n:]
    dt_raw = layers.matmul('btd,dh->bth', x_btd.astype(jnp.float32), self.w_dt, jnp.float32)
    dt = jax.nn.softplus(dt_raw + self.dt_bias[...].astype(jnp.float32))
    log_decay = -dt * jnp.exp(self.a_log[...].astype(jnp.float32))
    return z, xs, bs, c_s, dt, log_decay, history

  def _finish(self, y_bthp, x_bthp, z_bthp):
    cdt = self.compute_dtype
    y = y_bthp.astype(jnp.float32) + self.d_skip[...][:, None] * x_bthp.astype(jnp.float32)
    y = self.norm((y * jax.nn.silu(z_bthp.astype(jnp.float32))).astype(cdt))
    y = constrain(y, ('act_batch', 'act_length', 'act_heads', None))
    out = layers.matmul('bthp,hpd->btd', y, self.w_out, cdt)
    return constrain(out, ('act_batch', 'act_length', 'act_embed'))

  def _ssd(self, xs, bs, c_s, dt, log_decay, segment_ids, initial_state=None,
           return_final_state=False):
    h = self.num_heads
    q = jnp.broadcast_to(c_s[:, :, None], c_s.shape[:2] + (h, self.state_dim))
    k = jnp.broadcast_to(bs[:, :, None], q.shape)
    v = (xs.astype(jnp.float32) * dt[..., None]).astype(self.compute_dtype)
    return scan_op(q, k, v, log_decay, segment_ids, scale=1.0, initial_state=initial_state,
                   return_final_state=return_final_state, **self.scan)

  def __call__(self, x_btd: jax.Array, ctx: layers.Context) -> jax.Array:
    z, xs, bs, c_s, dt, log_decay, _ = self._inputs(x_btd, ctx.segment_ids)
    y = self._ssd(xs, bs, c_s, dt, log_decay, ctx.segment_ids)
    return self._finish(y, xs, z)

  def init_cache(self, batch: int, max_len: int, dtype=None):
    """SSM state [B, H, N, P] float32 and conv history [B, W - 1, channels]: O(1) in max_len."""
    del max_len
    channels = self.num_heads * self.head_dim + 2 * self.state_dim
    return {'state': jnp.zeros((batch, self.num_heads, self.state_dim, self.head_dim),
                               jnp.float32),
            'conv': jnp.zeros((batch, self.conv_width - 1, channels),
                              self.compute_dtype if dtype is None else dtype)}

  def prefill(self, x_btd: jax.Array, ctx: layers.Context, cache):
    z, xs, bs, c_s, dt, log_decay, history = self._inputs(x_btd, ctx.segment_ids, cache['conv'])
    y, state = self._ssd(xs, bs, c_s, dt, log_decay, ctx.segment_ids, cache['state'], True)
    return self._finish(y, xs, z), {'state': state, 'conv': history.astype(cache['conv'].dtype)}

  def decode(self, x_b1d: jax.Array, position: jax.Array, cache):
    del position
    z, xs, bs, c_s, dt, log_decay, history = self._inputs(x_b1d, None, cache['conv'])
    h = self.num_heads
    q = jnp.broadcast_to(c_s[:, 0, None], (x_b1d.shape[0], h, self.state_dim))
    v = xs[:, 0].astype(jnp.float32) * dt[:, 0, :, None]
    y, state = cs.recurrent_step(cache['state'], q, jnp.broadcast_to(bs[:, 0, None], q.shape), v,
                                 log_decay[:, 0])
    out = self._finish(y[:, None], xs, z)
    return out, {'state': state, 'conv': history.astype(cache['conv'].dtype)}

  @staticmethod
  def num_params(cfg) -> int:
    d, n, p, w = cfg.d_model, cfg.ssm_state_dim, cfg.ssm_head_dim, cfg.ssm_conv_width
    e = cfg.ssm_expand * d
    h = e // p
    projections = d * (2 * e + 2 * n + h) + e * d
    conv = (w + 1) * (e + 2 * n)
    return projections + conv + 3 * h + p

  @staticmethod
  def flops_per_token(cfg, seq_len: int) -> float:
    """Projections and the conv (2 per weight), plus the SSD's chunked matmuls per head: intra-
    chunk C^T B scores and values at half, the state update and the state read (2*N*P each)."""
    d, n, p, w = cfg.d_model, cfg.ssm_state_dim, cfg.ssm_head_dim, cfg.ssm_conv_width
    e = cfg.ssm_expand * d
    h = e // p
    chunk = min(cfg.scan_chunk or cs.default_chunk(cfg.scan_backend), max(seq_len, 1))
    projections = 2 * (d * (2 * e + 2 * n + h) + e * d) + 2 * w * (e + 2 * n)
    return projections + h * (chunk * (n + p) + 4 * n * p)


# ------------------------------------------------------------------ Mamba-1

def selective_scan(dt_bte, a_en, x_bte, b_btn, c_btn, keep_bt=None, *, chunk: int,
                   initial_ben=None):
  """h_t = exp(dt_t A) * h_{t-1} + (dt_t x_t) B_t, y_t = h_t C_t: (y [B, T, E] f32, h_T).

  keep_bt False zeroes the carried state (a document start). A parallel (associative) scan
  inside each chunk and a sequential carry between chunks; the [B, chunk, E, N] decays and inputs
  exist one chunk at a time and are rematerialised in the backward pass, so memory stays
  O(T * E) for activations.
  """
  b, t, e = x_bte.shape
  n = a_en.shape[1]
  keep_bt = jnp.ones((b, t), bool) if keep_bt is None else keep_bt
  pad = -t % chunk
  if pad:  # identity steps: dt 0 gives decay 1 and input 0
    dt_bte, x_bte, b_btn, c_btn = (jnp.pad(z, [(0, 0), (0, pad), (0, 0)])
                                   for z in (dt_bte, x_bte, b_btn, c_btn))
    keep_bt = jnp.pad(keep_bt, [(0, 0), (0, pad)], constant_values=True)
  m = (t + pad) // chunk
  split = lambda z: jnp.moveaxis(z.reshape(b, m, chunk, *z.shape[2:]), 1, 0)
  h0 = jnp.zeros((b, e, n), jnp.float32) if initial_ben is None else initial_ben

  def combine(left, right):
    return left[0] * right[0], right[0] * left[1] + right[1]

  @jax.checkpoint
  def step(h, xs):
    dt, x, bb, c, keep = xs
    decay = jnp.exp(dt[..., None] * a_en) * keep[..., None, None]
    inputs = (dt * x)[..., None] * bb[:, :, None, :]
    a_cum, h_local = jax.lax.associative_scan(combine, (decay, inputs), axis=1)
    h_all = a_cum * h[:, None] + h_local
    return h_all[:, -1], jnp.einsum('bten,btn->bte', h_all, c)

  xs = tuple(split(z) for z in (dt_bte, x_bte, b_btn, c_btn, keep_bt))
  h_last, y = jax.lax.scan(step, h0, xs)
  return jnp.moveaxis(y, 0, 1).reshape(b, m * chunk, e)[:, :t], h_last


@MIXERS.register('mamba1')
class Mamba1(nnx.Module):
  """Mamba-1 mixer (selective scan, diagonal A); see the module docstring."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    prec = layers.Precision.from_config(cfg)
    d, n, w = cfg.d_model, cfg.ssm_state_dim, cfg.ssm_conv_width
    e, r = cfg.ssm_expand * d, mamba1_dt_rank(cfg)
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.num_layers)
    self.w_x = layers.normal_param(rngs, (d, e), ('embed', 'inner'), std, prec.param)
    self.w_z = layers.normal_param(rngs, (d, e), ('embed', 'inner'), std, prec.param)
    self.conv = _uniform_param(rngs, (w, e), ('conv', 'inner'), 1.0 / math.sqrt(w), prec.param)
    self.conv_bias = _param(jnp.zeros((e,), prec.param), ('inner',))
    self.w_dt_low = layers.normal_param(rngs, (e, r), ('inner', None), std, prec.param)
    self.w_b = layers.normal_param(rngs, (e, n), ('inner', 'state'), std, prec.param)
    self.w_c = layers.normal_param(rngs, (e, n), ('inner', 'state'), std, prec.param)
    self.w_dt = _uniform_param(rngs, (r, e), (None, 'inner'), r ** -0.5, prec.param)
    self.dt_bias = _param(_dt_bias(rngs, (e,)), ('inner',))
    a = jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (e, n))  # S4D-real
    self.a_log = _param(jnp.log(a), ('inner', 'state'))
    self.d_skip = _param(jnp.ones((e,), jnp.float32), ('inner',))
    self.w_out = layers.normal_param(rngs, (e, d), ('inner', 'embed'), out_std, prec.param)
    self.chunk = cfg.scan_chunk or 64
    self.inner, self.state_dim, self.conv_width = e, n, w
    self.compute_dtype = prec.compute

  def _inputs(self, x_btd, segment_ids, conv_cache=None):
    cdt = self.compute_dtype
    xs, z = layers.matmuls(x_btd, [('btd,de->bte', self.w_x), ('btd,de->bte', self.w_z)], cdt)
    if x_btd.shape[1] == 1 and conv_cache is not None:
      y, history = conv_step(xs[:, 0], self.conv[...], self.conv_bias[...], conv_cache)
      y = y[:, None]
    else:
      y, history = causal_conv(xs, self.conv[...], self.conv_bias[...], segment_ids, conv_cache)
    xs = constrain(jax.nn.silu(y), ('act_batch', 'act_length', 'act_inner'))
    dt_low, bs, c_s = layers.matmuls(xs, [('bte,er->btr', self.w_dt_low),
                                          ('bte,en->btn', self.w_b), ('bte,en->btn', self.w_c)],
                                     cdt)
    dt = jax.nn.softplus(layers.matmul('btr,re->bte', dt_low.astype(jnp.float32), self.w_dt,
                                       jnp.float32) + self.dt_bias[...].astype(jnp.float32))
    bs, c_s = bs.astype(jnp.float32), c_s.astype(jnp.float32)
    keep = (None if segment_ids is None
            else ~cs.reference.resets(segment_ids, *segment_ids.shape))
    return xs, z, dt, bs, c_s, keep, history

  def _a(self) -> jax.Array:
    return -jnp.exp(self.a_log[...].astype(jnp.float32))

  def _finish(self, y_bte, xs, z):
    cdt = self.compute_dtype
    y = (y_bte + self.d_skip[...] * xs.astype(jnp.float32)) * jax.nn.silu(z.astype(jnp.float32))
    y = constrain(y.astype(cdt), ('act_batch', 'act_length', 'act_inner'))
    out = layers.matmul('bte,ed->btd', y, self.w_out, cdt)
    return constrain(out, ('act_batch', 'act_length', 'act_embed'))

  def __call__(self, x_btd: jax.Array, ctx: layers.Context) -> jax.Array:
    xs, z, dt, bs, c_s, keep, _ = self._inputs(x_btd, ctx.segment_ids)
    y, _ = selective_scan(dt, self._a(), xs.astype(jnp.float32), bs, c_s, keep, chunk=self.chunk)
    return self._finish(y, xs, z)

  def init_cache(self, batch: int, max_len: int, dtype=None):
    """SSM state [B, E, N] float32 and conv history [B, W - 1, E]: O(1) in max_len."""
    del max_len
    return {'state': jnp.zeros((batch, self.inner, self.state_dim), jnp.float32),
            'conv': jnp.zeros((batch, self.conv_width - 1, self.inner),
                              self.compute_dtype if dtype is None else dtype)}

  def prefill(self, x_btd: jax.Array, ctx: layers.Context, cache):
    xs, z, dt, bs, c_s, keep, history = self._inputs(x_btd, ctx.segment_ids, cache['conv'])
    y, state = selective_scan(dt, self._a(), xs.astype(jnp.float32), bs, c_s, keep,
                              chunk=self.chunk, initial_ben=cache['state'])
    return self._finish(y, xs, z), {'state': state, 'conv': history.astype(cache['conv'].dtype)}

  def decode(self, x_b1d: jax.Array, position: jax.Array, cache):
    del position
    xs, z, dt, bs, c_s, _, history = self._inputs(x_b1d, None, cache['conv'])
    decay = jnp.exp(dt[:, 0, :, None] * self._a())
    inputs = (dt[:, 0] * xs[:, 0].astype(jnp.float32))[..., None] * bs[:, 0, None]
    state = decay * cache['state'] + inputs
    y = jnp.einsum('ben,bn->be', state, c_s[:, 0])[:, None]
    return self._finish(y, xs, z), {'state': state, 'conv': history.astype(cache['conv'].dtype)}

  @staticmethod
  def num_params(cfg) -> int:
    d, n, w = cfg.d_model, cfg.ssm_state_dim, cfg.ssm_conv_width
    e, r = cfg.ssm_expand * d, mamba1_dt_rank(cfg)
    return 3 * d * e + (w + 1) * e + e * (r + 2 * n) + r * e + e + e * n + e

  @staticmethod
  def flops_per_token(cfg, seq_len: int) -> float:
    """Projections and the conv (2 per weight) and the scan's work per token: the state update
    and the output read, ~6 flops per state entry (E * N), not matmul-shaped."""
    del seq_len
    d, n, w = cfg.d_model, cfg.ssm_state_dim, cfg.ssm_conv_width
    e, r = cfg.ssm_expand * d, mamba1_dt_rank(cfg)
    return 2 * (3 * d * e + e * (r + 2 * n) + r * e) + 2 * w * e + 6 * e * n


def mamba1_dt_rank(cfg) -> int:
  return cfg.ssm_dt_rank or math.ceil(cfg.d_model / 16)
