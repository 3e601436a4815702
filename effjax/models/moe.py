"""Mixture-of-experts feed-forward: a float32 router, SwiGLU experts as grouped matmuls, expert
parallelism over a mesh axis.

Routing (model.moe_routing):
  'token_choice'   each token picks its top_k experts by router probability. With top_k = 1
                   (Switch) the output is scaled by that raw probability (renormalising a single
                   choice would make it 1 and cut the router off from the loss); with top_k > 1
                   (Mixtral) the top_k probabilities are renormalised to sum to 1.
  'expert_choice'  each expert picks the C tokens with the highest router probability for it and
                   scales its output by that probability; a token may be picked by any number of
                   experts, none included. The choice looks at every token of the routing group,
                   later ones too, so it is not causal (the usual caveat for decoder LMs).

Capacity. A routing group is the tokens one device holds (all tokens of the batch without a
mesh); C = ceil(capacity_factor * group_tokens * top_k / num_experts), at most group_tokens.
Token choice with capacity_factor 0 is dropless: every slot is computed. With capacity_factor > 0
each expert keeps at most C slots, in the order of the flattened group (batch row, then position)
and, within one token, of the choice rank (its first choice before its second): slot (t, j) has
priority t * top_k + j. A dropped slot contributes 0, and the residual stream carries the token
on. Expert choice always runs with a capacity (capacity_factor must be > 0).

Execution sorts the (token, expert) slots by expert, runs gate and up (side by side, one call)
and down as two grouped matmuls over the sorted rows (effjax.kernels.grouped_matmul, or
jax.lax.ragged_dot until that package imports), unsorts and sums each token's slots weighted by
the router. A W8A8 model (effjax.compress) runs both grouped matmuls int8 x int8: the sorted rows
are rounded with the calibrated static scale of the experts' input (and of the hidden SwiGLU
activation for down) and multiplied by the int8 experts with int32 accumulation
(jax.lax.ragged_dot; `int8_gmm`).

Expert parallelism: under a mesh the routed part runs in jax.shard_map. Tokens are split over the
batch axes of 'act_batch' and the expert axes of 'experts' (the expert axis is extra data
parallelism for tokens); every device routes its own tokens, sends each peer the rows for that
peer's experts with an all_to_all over the expert axes, runs its local experts and returns the
results with the reverse all_to_all. The buffers have static shapes: [peers, cap, d_model] with
cap = E_local * C under a capacity, and, dropless, the worst case cap = every local slot (all of a
device's slots may go to one peer), i.e. peers times the slots: memory to keep in mind at scale.
The experts' mlp dimension is not tensor-parallel inside the map (the weights are gathered).

Padding tokens (segment id 0) are never routed and count in no loss or metric. Each call records
its router statistics (load-balancing loss, z-loss, load per expert, router entropy, dropped
fraction) into the innermost `collect_stats()` context, from which the LM gathers them per layer.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from effjax.models import layers
from effjax.models.registry import FEED_FORWARDS
from effjax.parallel.sharding import constrain, current_rules, logical_to_spec

try:
  from effjax.kernels.grouped_matmul import GMM_BACKENDS, grouped_matmul
  GMM_IMPORT_ERROR = ''
except ImportError as e:  # without the kernel package, jax.lax.ragged_dot does the work
  GMM_BACKENDS, grouped_matmul = ('auto', 'ragged_dot'), None
  GMM_IMPORT_ERROR = f'{type(e).__name__}: {e}'

ROUTINGS = ('token_choice', 'expert_choice')
ACT_BTD = ('act_batch', 'act_length', 'act_embed')
Stats = dict[str, jax.Array]

_SINK: contextvars.ContextVar[list | None] = contextvars.ContextVar('moe_stats', default=None)


@contextlib.contextmanager
def collect_stats() -> Iterator[list[Stats]]:
  """Every MoE call inside appends its per-layer statistics to the yielded list (trace time)."""
  sink: list[Stats] = []
  token = _SINK.set(sink)
  try:
    yield sink
  finally:
    _SINK.reset(token)


def stack_stats(per_layer: list[Stats]) -> Stats:
  """[{name: x}] per layer -> {name: x stacked on a leading layer axis}; {} for no layers."""
  if not per_layer:
    return {}
  return {k: jnp.stack([s[k] for s in per_layer]) for k in per_layer[0]}


SUMMARY_KEYS = ('loss', 'aux_loss', 'z_loss', 'dropped_fraction', 'router_entropy', 'load_max',
                'load_min')


def summary_keys(num_experts: int) -> tuple[str, ...]:
  """Every scalar `summarize` returns: SUMMARY_KEYS and one load_eNN per expert."""
  return SUMMARY_KEYS + tuple(f'load_e{i:02d}' for i in range(num_experts))


def summarize(stacked: Stats) -> Stats:
  """Layer-stacked statistics -> the scalars training uses and reports.

  'loss' is the weighted auxiliary loss summed over layers (what training adds); the unweighted
  losses, entropy and dropped fraction are means over layers; load_max/load_min the largest and
  smallest fraction of slots any expert of any layer received (1/E each when balanced), and
  load_eNN expert NN's fraction averaged over the layers.
  """
  if not stacked:
    return {}
  out = {k: jnp.mean(stacked[k]) for k in ('aux_loss', 'z_loss', 'dropped_fraction',
                                           'router_entropy')}
  out['loss'] = jnp.sum(stacked['loss'])
  out['load_max'] = jnp.max(stacked['load'])
  out['load_min'] = jnp.min(stacked['load'])
  per_expert = jnp.mean(stacked['load'], axis=0)
  out.update({f'load_e{i:02d}': per_expert[i] for i in range(per_expert.shape[0])})
  return out


def expert_mlp_dim(cfg) -> int:
  return cfg.moe_expert_mlp_dim or layers.mlp_dim(cfg)


def capacity(cfg, group_tokens: int) -> int:
  """Slots each expert keeps from a group of tokens; 0 = dropless (token choice only)."""
  if cfg.moe_capacity_factor <= 0:
    return 0
  c = math.ceil(cfg.moe_capacity_factor * group_tokens * cfg.moe_top_k / cfg.moe_num_experts)
  return max(1, min(c, group_tokens))


def gmm(lhs_md: jax.Array, rhs_gdn: jax.Array, group_sizes_g: jax.Array,
        backend: str, interpret: bool = False) -> jax.Array:
  """Grouped matmul: rows of group g times rhs[g]; rows past sum(group_sizes) give 0."""
  if grouped_matmul is None:
    if backend not in GMM_BACKENDS:
      raise ValueError(f"model.moe_gmm_backend={backend!r}: effjax.kernels.grouped_matmul did "
                       f"not import ({GMM_IMPORT_ERROR}); use 'auto' or 'ragged_dot'")
    return jax.lax.ragged_dot(lhs_md, rhs_gdn, group_sizes_g)
  return grouped_matmul(lhs_md, rhs_gdn, group_sizes_g, backend=backend, interpret=interpret)


def _swiglu_experts(x_sd, experts, group_sizes_e, backend, observe_hidden=None):
  """SwiGLU over expert-sorted rows; the gate and up weights sit side by side ([E, D, 2F]), so
  both projections are one grouped matmul of twice the width: the rows are read once, the
  kernel's N tiles are twice as many (better occupancy at small F), and the backward is one
  d_lhs and one weight-gradient call instead of two of each. backend: (name, interpret).

  experts: (w_gate_up, w_down) in the compute dtype, or W8A8's six operands (int8 gate_up,
  its scales [E, 1, 2F], int8 down, its scales [E, 1, D], the static scales of the input and of
  the hidden activation), which multiply int8 rows by int8 weights (`int8_gmm`).
  observe_hidden(h): calibration's hook on the down projection's input."""
  if len(experts) == 2:
    w_gate_up_edf, w_down_efd = experts
    product = lambda x, w: gmm(x, w, group_sizes_e, *backend)  # noqa: E731
    gate_up = product(x_sd, w_gate_up_edf)
  else:
    q_gate_up, s_gate_up, q_down, s_down, act_in, act_hidden = experts
    gate_up = int8_gmm(x_sd, act_in, q_gate_up, s_gate_up, group_sizes_e).astype(x_sd.dtype)
  gate, up = jnp.split(gate_up, 2, axis=-1)
  hidden = jax.nn.silu(gate) * up
  if observe_hidden is not None:
    observe_hidden(hidden)
  if len(experts) == 2:
    return product(hidden, w_down_efd)
  return int8_gmm(hidden, act_hidden, q_down, s_down, group_sizes_e).astype(x_sd.dtype)


INT8_MAX = 127.0


def _row_groups(group_sizes_g: jax.Array, rows: int) -> jax.Array:
  """The group of each of `rows` sorted rows (rows past the groups' total: the last group)."""
  ends = jnp.cumsum(group_sizes_g)
  return jnp.minimum(jnp.searchsorted(ends, jnp.arange(rows), side='right'),
                     group_sizes_g.shape[0] - 1)


def int8_rows(x_md, act_scale):
  """int8_gmm's activation rounding: x / act_scale in float32, half to even, clipped to
  [-INT8_MAX, INT8_MAX], as int8."""
  xq = jnp.clip(jnp.round(x_md.astype(jnp.float32) / act_scale), -INT8_MAX, INT8_MAX)
  return xq.astype(jnp.int8)


@jax.custom_vjp
def int8_gmm(x_md, act_scale, q_gkn, scale_g1n, group_sizes_g):
  """W8A8 grouped matmul: rows of group g, rounded to int8 with the static scale act_scale,
  times the int8 weight q[g], accumulated in int32 (jax.lax.ragged_dot), then scaled by
  act_scale and q[g]'s per-output-channel scales; float32 [M, N]. Rows past sum(group_sizes)
  give 0. The gradient to x passes straight through the rounding (zero where x was clipped to
  the calibrated range) and through the dequantized weights, as effjax.compress.quantize's
  dense W8A8 product does; the weights and scales take none. The integer accumulator is exact
  on CPU and on an H100 (JAX 0.11.2); there the activation rounding (int8_rows) put 1 float32
  entry of 476,672 on the other neighbouring integer than numpy's division does (presumably a
  quotient at a half-integer tie; the check now tests that), which moved that row's outputs by
  5.5e-4 of the largest output (experiments/gpu_smoke/moe_w8a8_check.py)."""
  acc = jax.lax.ragged_dot(int8_rows(x_md, act_scale), q_gkn, group_sizes_g,
                           preferred_element_type=jnp.int32)
  g, _, n = q_gkn.shape
  rows = _row_groups(group_sizes_g, x_md.shape[0])
  return acc.astype(jnp.float32) * (act_scale * scale_g1n.reshape(g, n)[rows])


def _int8_gmm_fwd(x_md, act_scale, q_gkn, scale_g1n, group_sizes_g):
  return (int8_gmm(x_md, act_scale, q_gkn, scale_g1n, group_sizes_g),
          (x_md, act_scale, q_gkn, scale_g1n, group_sizes_g))


def _int8_gmm_bwd(residuals, g_mn):
  x_md, act_scale, q_gkn, scale_g1n, group_sizes_g = residuals
  w_gnk = jnp.swapaxes(q_gkn.astype(jnp.float32) * scale_g1n, 1, 2)
  dx = jax.lax.ragged_dot(g_mn.astype(jnp.float32), w_gnk, group_sizes_g)
  dx = jnp.where(jnp.abs(x_md.astype(jnp.float32)) <= INT8_MAX * act_scale, dx, 0.0)
  return (dx.astype(x_md.dtype), jnp.zeros_like(act_scale),
          np.zeros(q_gkn.shape, jax.dtypes.float0), jnp.zeros_like(scale_g1n),
          np.zeros(group_sizes_g.shape, jax.dtypes.float0))


int8_gmm.defvjp(_int8_gmm_fwd, _int8_gmm_bwd)


def _inverse(order_s: jax.Array) -> jax.Array:
  return jnp.zeros_like(order_s).at[order_s].set(jnp.arange(order_s.shape[0], dtype=order_s.dtype))


@jax.custom_vjp
def _permute(x_sd: jax.Array, order_s: jax.Array, inverse_s: jax.Array) -> jax.Array:
  """x_sd[order_s] for a permutation order_s whose inverse is inverse_s. Its gradient is the
  inverse gather, g[inverse_s]; autodiff of the plain gather would scatter-add instead, which
  took a tenth of the MoE training step on an H200 (experiments/moe/README.md)."""
  return x_sd[order_s]


def _permute_fwd(x_sd, order_s, inverse_s):
  return x_sd[order_s], inverse_s


def _permute_bwd(inverse_s, g_sd):
  return g_sd[inverse_s], None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def _exchange(x_sd, group_sizes_e, weights, *, cap: int, ep_axes: tuple[str, ...], n_ep: int,
              backend: tuple[str, bool], observe_hidden=None) -> jax.Array:
  """Expert-sorted slot rows -> their expert outputs, the experts living on n_ep peers.

  Rows [start_p, start_p + count_p) belong to peer p's experts; each peer gets a [cap, d] block
  (rows past its count are zero), sorts what it received from all peers by its local expert, runs
  them, and sends each block back where it came from.
  """
  s, d = x_sd.shape
  e_loc = group_sizes_e.shape[0] // n_ep
  counts_pe = group_sizes_e.reshape(n_ep, e_loc)
  peer_count = counts_pe.sum(1)
  peer_start = jnp.cumsum(peer_count) - peer_count
  slot = jnp.arange(cap)
  rows_pc = jnp.clip(peer_start[:, None] + slot[None], 0, s - 1)
  sent = jnp.where((slot[None] < peer_count[:, None])[..., None], x_sd[rows_pc], 0)
  recv_pcd = jax.lax.all_to_all(sent, ep_axes, 0, 0)  # [source peer, cap, d]
  recv_counts_pe = jax.lax.all_to_all(counts_pe, ep_axes, 0, 0)

  # Local expert of each received row (e_loc for empty rows, which sort last).
  ends_pe = jnp.cumsum(recv_counts_pe, axis=1)
  local_expert = jnp.sum(slot[None, :, None] >= ends_pe[:, None, :], axis=-1).reshape(-1)
  order = jnp.argsort(local_expert, stable=True)
  out_sd = _swiglu_experts(recv_pcd.reshape(-1, d)[order], weights, recv_counts_pe.sum(0),
                           backend, observe_hidden)
  back = jax.lax.all_to_all(out_sd[_inverse(order)].reshape(n_ep, cap, d), ep_axes, 0, 0)

  r = jnp.arange(s)
  peer_r = jnp.minimum(jnp.sum(r[:, None] >= jnp.cumsum(peer_count)[None], axis=-1), n_ep - 1)
  pos_r = jnp.clip(r - peer_start[peer_r], 0, cap - 1)
  return jnp.where((r < peer_count.sum())[:, None], back[peer_r, pos_r], 0)


def route_and_run(x_btd, valid_bt, router_de, *experts, cfg, compute_dtype,
                  token_axes: tuple[str, ...] = (), ep_axes: tuple[str, ...] = (), n_ep: int = 1,
                  observe_hidden=None) -> tuple[jax.Array, Stats]:
  """The routed experts on one routing group (one device's tokens, or all tokens without a mesh).

  Statistics are summed over token_axes before they are formed, so they are those of the global
  batch. Expert weights hold the local experts (E / n_ep of them) when n_ep > 1; `experts` as
  _swiglu_experts takes them.
  """
  b, t, d = x_btd.shape
  n, e, k = b * t, cfg.moe_num_experts, cfg.moe_top_k
  x_nd = x_btd.reshape(n, d)
  valid_n = valid_bt.reshape(n)
  logits_ne = jnp.einsum('nd,de->ne', x_nd.astype(jnp.float32), router_de.astype(jnp.float32))
  probs_ne = jax.nn.softmax(logits_ne, axis=-1)
  c = capacity(cfg, n)

  if cfg.moe_routing == 'token_choice':
    top_p_nk, top_e_nk = jax.lax.top_k(probs_ne, k)
    if k > 1:
      top_p_nk = top_p_nk / jnp.sum(top_p_nk, axis=-1, keepdims=True)
    slot_expert = top_e_nk.reshape(-1)  # slot s = t * k + j: token-major priority
    slot_token = jnp.repeat(jnp.arange(n), k)
    slot_weight = top_p_nk.reshape(-1)
    routed = jnp.repeat(valid_n, k)  # slots the router assigned (before capacity)
    keep = routed
    if c:
      hits_se = (slot_expert[:, None] == jnp.arange(e)[None]) & routed[:, None]
      rank = jnp.take_along_axis(jnp.cumsum(hits_se, axis=0), slot_expert[:, None], axis=1)[:, 0]
      keep = routed & (rank <= c)  # rank counts this slot itself
  else:
    score_en = jnp.where(valid_n[None], probs_ne.T, -1.0)  # padding is picked last, then dropped
    _, top_t_ec = jax.lax.top_k(score_en, c)
    slot_expert = jnp.repeat(jnp.arange(e), c)
    slot_token = top_t_ec.reshape(-1)
    slot_weight = probs_ne[slot_token, slot_expert]
    keep = routed = valid_n[slot_token]

  # Statistics, from sums over the global batch.
  valid_f = valid_n.astype(jnp.float32)
  lse_n = jax.nn.logsumexp(logits_ne, axis=-1)
  entropy_n = -jnp.sum(probs_ne * jnp.log(jnp.maximum(probs_ne, 1e-30)), axis=-1)
  slot_hits_e = jnp.zeros((e,), jnp.float32).at[slot_expert].add(routed.astype(jnp.float32))
  sums = {
      'tokens': jnp.sum(valid_f), 'slots': jnp.sum(routed.astype(jnp.float32)),
      'kept': jnp.sum(keep.astype(jnp.float32)), 'slot_hits': slot_hits_e,
      'prob': jnp.sum(probs_ne * valid_f[:, None], axis=0),
      'lse_sq': jnp.sum(jnp.square(lse_n) * valid_f), 'entropy': jnp.sum(entropy_n * valid_f)}
  if cfg.moe_routing == 'expert_choice':  # tokens no expert picked
    picked = jnp.zeros((n,), bool).at[slot_token].max(keep)
    sums['unpicked'] = jnp.sum((valid_n & ~picked).astype(jnp.float32))
  if token_axes:
    sums = jax.lax.psum(sums, token_axes)
  tokens = jnp.maximum(sums['tokens'], 1.0)
  load_e = sums['slot_hits'] / jnp.maximum(sums['slots'], 1.0)
  aux = e * jnp.sum(load_e * sums['prob'] / tokens)
  z = sums['lse_sq'] / tokens
  if cfg.moe_routing == 'expert_choice':
    dropped = sums['unpicked'] / tokens
  else:
    dropped = 1.0 - sums['kept'] / jnp.maximum(sums['slots'], 1.0)
  stats = {'loss': cfg.moe_aux_loss_weight * aux + cfg.moe_z_loss_weight * z, 'aux_loss': aux,
           'z_loss': z, 'load': load_e, 'router_entropy': sums['entropy'] / tokens,
           'dropped_fraction': dropped}

  # Dispatch: slots sorted by expert (dropped and padding slots last), grouped matmuls, unsort.
  key = jnp.where(keep, slot_expert, e)
  order = jnp.argsort(key, stable=True)
  group_sizes_e = jnp.bincount(key, length=e + 1)[:e].astype(jnp.int32)
  inverse = _inverse(order)
  if cfg.moe_routing == 'token_choice':  # slot s belongs to token s // k: a permutation of copies
    x_sd = _permute(jnp.repeat(x_nd, k, axis=0), order, inverse)
  else:
    x_sd = x_nd[slot_token[order]]
  # Weights replicated over the token axes stay so: the grouped-matmul VJPs total their per-device
  # weight gradient over those axes themselves (kernels._compat.sum_to_varying).
  backend = (cfg.moe_gmm_backend, cfg.moe_gmm_interpret)
  if n_ep == 1:
    out_sd = _swiglu_experts(x_sd, experts, group_sizes_e, backend, observe_hidden)
  else:
    s = x_sd.shape[0]
    cap = s if not c else min(s, (e // n_ep) * c)
    out_sd = _exchange(x_sd, group_sizes_e, experts, cap=cap, ep_axes=ep_axes, n_ep=n_ep,
                       backend=backend, observe_hidden=observe_hidden)
  gate_s = jnp.where(keep, slot_weight, 0.0).astype(compute_dtype)
  contrib_sd = _permute(out_sd, inverse, order) * gate_s[:, None]
  if cfg.moe_routing == 'token_choice':
    y_nd = contrib_sd.reshape(n, k, d).sum(axis=1)
  else:
    y_nd = jnp.zeros((n, d), contrib_sd.dtype).at[slot_token].add(contrib_sd)
  return y_nd.reshape(b, t, d).astype(compute_dtype), stats


def _mesh_axes(mesh, logical: str) -> tuple[str, ...]:
  """The mesh axes (of size > 1) a logical name maps to."""
  axes = logical_to_spec((logical,))[0]
  axes_t = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return tuple(a for a in axes_t if mesh.shape[a] > 1)


def _int8_operands(weight):
  """A calibrated W8A8 weight's (int8 values, scales, input scale); None for any other."""
  hook = getattr(type(weight), 'int8_operands', None)
  return None if hook is None else hook(weight)


@FEED_FORWARDS.register('moe')
class MoE(nnx.Module):
  """Routed SwiGLU experts (+ optional always-on shared experts); see the module docstring."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    if cfg.moe_routing not in ROUTINGS:
      raise ValueError(f'model.moe_routing={cfg.moe_routing!r}: allowed: {", ".join(ROUTINGS)}')
    if not 1 <= cfg.moe_top_k <= cfg.moe_num_experts:
      raise ValueError(f'model.moe_top_k={cfg.moe_top_k}: must be in [1, model.moe_num_experts='
                       f'{cfg.moe_num_experts}]')
    if cfg.moe_routing == 'expert_choice' and cfg.moe_capacity_factor <= 0:
      raise ValueError(f'model.moe_capacity_factor={cfg.moe_capacity_factor}: expert_choice '
                       'routing needs a capacity; set it > 0 (e.g. 1.0)')
    prec = layers.Precision.from_config(cfg)
    d, e, f = cfg.d_model, cfg.moe_num_experts, expert_mlp_dim(cfg)
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.num_layers)
    # The router stays float32 whatever the parameter dtype: top-k decisions are sensitive to it.
    self.router = layers.normal_param(rngs, (d, e), ('embed', None), std, jnp.float32)
    self.w_gate = layers.normal_param(rngs, (e, d, f), ('experts', 'embed', 'mlp'), std, prec.param)
    self.w_up = layers.normal_param(rngs, (e, d, f), ('experts', 'embed', 'mlp'), std, prec.param)
    self.w_down = layers.normal_param(rngs, (e, f, d), ('experts', 'mlp', 'embed'), out_std,
                                      prec.param)
    shared = cfg.moe_num_shared_experts * f  # S shared experts = one SwiGLU S times as wide
    if shared:
      self.shared_gate = layers.normal_param(rngs, (d, shared), ('embed', 'mlp'), std, prec.param)
      self.shared_up = layers.normal_param(rngs, (d, shared), ('embed', 'mlp'), std, prec.param)
      self.shared_down = layers.normal_param(rngs, (shared, d), ('mlp', 'embed'), out_std,
                                             prec.param)
    self.cfg = ml_collections.FrozenConfigDict(cfg)  # static and hashable: part of the graphdef
    self.compute_dtype = prec.compute

  def __call__(self, x_btd: jax.Array, ctx: layers.Context) -> jax.Array:
    cdt = self.compute_dtype
    valid_bt = (jnp.ones(x_btd.shape[:2], bool) if ctx.segment_ids is None
                else ctx.segment_ids > 0)
    int8 = [_int8_operands(w) for w in (self.w_gate, self.w_up, self.w_down)]
    if all(o is not None for o in int8):
      # W8A8 (effjax.compress): int8 rows times int8 experts. Gate and up saw the same input,
      # so their calibrated scales agree; the larger is taken.
      (q_gate, s_gate, a_gate), (q_up, s_up, a_up), (q_down, s_down, a_down) = int8
      experts = (jnp.concatenate([q_gate, q_up], -1), jnp.concatenate([s_gate, s_up], -1),
                 q_down, s_down, jnp.maximum(a_gate, a_up), a_down)
    else:
      # Gate and up side by side: the cast to the compute dtype copies them anyway, so the
      # concatenation is free (one fusion), and its gradient's split fuses into the cast back.
      experts = (jnp.concatenate([self.w_gate[...].astype(cdt), self.w_up[...].astype(cdt)], -1),
                 self.w_down[...].astype(cdt))
    observe = getattr(type(self.w_gate), 'observe_input', None)
    observe_hidden = None
    if observe is not None:  # calibration (effjax.compress): the experts' inputs' max|x|
      self.w_gate.observe_input(x_btd)
      self.w_up.observe_input(x_btd)
      observe_hidden = self.w_down.observe_input
    run = functools.partial(route_and_run, cfg=self.cfg, compute_dtype=cdt,
                            observe_hidden=observe_hidden)
    y, stats = self._sharded(run, x_btd, valid_bt, self.router[...], *experts)
    if self.cfg.moe_num_shared_experts:
      gate, up = layers.matmuls(x_btd, [('btd,df->btf', self.shared_gate),
                                        ('btd,df->btf', self.shared_up)], cdt)
      hidden = constrain(jax.nn.silu(gate) * up, ('act_batch', 'act_length', 'act_mlp'))
      y = y + layers.matmul('btf,fd->btd', hidden, self.shared_down, cdt)
    sink = _SINK.get()
    if sink is not None:
      sink.append(stats)
    return constrain(y, ACT_BTD)

  def _sharded(self, run, x_btd, valid_bt, router_de, *experts):
    """run() per device under the current mesh (tokens split, experts over the expert axes)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or not current_rules():
      return run(x_btd, valid_bt, router_de, *experts)
    b = x_btd.shape[0]
    ep_axes = _mesh_axes(mesh, 'experts')
    batch_axes = []
    for a in _mesh_axes(mesh, 'act_batch') + ep_axes:  # the expert axes also split the tokens
      if a not in batch_axes and b % math.prod(mesh.shape[x] for x in batch_axes + [a]) == 0:
        batch_axes.append(a)
    n_ep = math.prod(mesh.shape[a] for a in ep_axes)
    if self.cfg.moe_num_experts % n_ep:
      raise ValueError(f'model.moe_num_experts={self.cfg.moe_num_experts}: not divisible by the '
                       f'expert-parallel size {n_ep} (mesh axes {ep_axes})')
    if not set(ep_axes) <= set(batch_axes):
      # Too few sequences to split over the expert axes too (decoding one sequence): every device
      # runs every expert on its tokens, with the expert weights gathered.
      ep_axes, n_ep = (), 1
    token_axes = tuple(batch_axes)
    x_spec = P(token_axes or None, None, None)
    w_spec = P(ep_axes or None, None, None)
    fn = functools.partial(run, token_axes=token_axes, ep_axes=ep_axes, n_ep=n_ep)
    stats_spec = {k: P() for k in ('loss', 'aux_loss', 'z_loss', 'load', 'router_entropy',
                                   'dropped_fraction')}
    expert_specs = tuple(w_spec if w.ndim == 3 else P() for w in experts)  # W8A8's scalars: P()
    return jax.shard_map(fn, mesh=mesh, in_specs=(x_spec, P(token_axes or None, None), P(),
                                                  *expert_specs),
                         out_specs=(x_spec, stats_spec))(x_btd, valid_bt, router_de, *experts)

  @staticmethod
  def num_params(cfg) -> int:
    d, e, f = cfg.d_model, cfg.moe_num_experts, expert_mlp_dim(cfg)
    return d * e + 3 * e * d * f + 3 * d * f * cfg.moe_num_shared_experts

  @staticmethod
  def active_params(cfg) -> int:
    """What one token runs through: the router, top_k routed experts and the shared experts.

    Expert choice counts top_k experts per token too (its average when capacity_factor is 1).
    """
    d, f = cfg.d_model, expert_mlp_dim(cfg)
    return d * cfg.moe_num_experts + 3 * d * f * (cfg.moe_top_k + cfg.moe_num_shared_experts)

  @staticmethod
  def flops_per_token(cfg, seq_len: int) -> float:
    """Active parameters only (active_params), two FLOPs each."""
    del seq_len
    return 2 * MoE.active_params(cfg)
