"""Early-exit heads: logits after intermediate layers, their losses, confidence and calibration.

`model.exit_layers = '2,4'` puts an exit after the 2nd and the 4th block. An exit reads the residual
stream there and applies a head: the final norm and output projection shared with the last layer
(`model.exit_head = 'shared'`, no new parameters), its own RMSNorm before the shared projection
('norm'), or its own norm and projection ('own'). The heads' parameters live in `LM.exit_heads`
and carry the usual logical axis names, so they shard like the final head under any mesh.

Training (`hidden_states` + `exit_losses`): the layer stack runs in pieces cut at the exits (a
scan over whole groups where it can, single blocks where an exit falls inside a group), so each
exit's hidden state is kept without stacking every layer's. Each exit's cross-entropy is computed
in sequence chunks with the head applied per chunk under `jax.checkpoint` (the [B, T, vocab]
logits are never held, as in the chunked final loss), optionally with a distillation term from
the final layer. `loss_weights` holds the schedules: constant, linear in depth, LayerSkip's
depth-increasing scale, and LayerSkip's rotational and gradual curricula.

Decoding (effjax/infer/exit_decode.py) asks an exit for its confidence (`confidence`: top-1
probability, top-1 minus top-2, normalised negative entropy, or the cosine between the hidden
state and the previous layer's) and exits when it beats a threshold; `calibrate_threshold` picks
that threshold on held-out data for a tolerated rate of tokens that differ from the full model's.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effjax.models import layers, moe, remat
from effjax.models.norms import RMSNorm
from effjax.models.registry import parse_pattern

HEADS = ('shared', 'norm', 'own')
SCHEDULES = ('constant', 'linear', 'layerskip')
CURRICULA = ('none', 'rotational', 'gradual')
CONFIDENCES = ('softmax', 'margin', 'entropy', 'state')


def parse_exit_layers(cfg) -> tuple[int, ...]:
  """model.exit_layers '2,4' -> (2, 4): sorted, unique, each in [1, num_layers)."""
  text = cfg.get('exit_layers', '') if hasattr(cfg, 'get') else cfg.exit_layers
  if not text or not str(text).strip():
    return ()
  try:
    values = [int(p) for p in str(text).split(',') if p.strip()]
  except ValueError:
    raise ValueError(f'model.exit_layers={text!r}: give comma-separated layer counts such as '
                     "'2,4'") from None
  if sorted(set(values)) != values or any(not 1 <= v < cfg.num_layers for v in values):
    raise ValueError(f'model.exit_layers={text!r}: must be increasing layer counts l with '
                     f'1 <= l < model.num_layers={cfg.num_layers} (the last one is the final head)')
  return tuple(values)


class ExitHeads(nnx.Module):
  """The exits' own norms and projections (empty for exit_head='shared')."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    prec = layers.Precision.from_config(cfg)
    self.exits = parse_exit_layers(cfg)
    self.kind = cfg.exit_head
    norm = dict(eps=cfg.norm_eps, param_dtype=prec.param, compute_dtype=prec.compute)
    if self.kind in ('norm', 'own'):
      self.norms = nnx.List([RMSNorm(cfg.d_model, **norm) for _ in self.exits])
    if self.kind == 'own':
      self.projections = nnx.List([
          layers.normal_param(rngs, (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'),
                              cfg.init_std, prec.param) for _ in self.exits])


def exit_norm(model, index: int, x_btd: jax.Array) -> jax.Array:
  """The normed hidden state exit `index` projects (the final norm when the head is shared)."""
  heads = model.exit_heads
  return heads.norms[index](x_btd) if heads.kind in ('norm', 'own') else model.final_norm(x_btd)


def exit_matrix(model, index: int) -> jax.Array:
  """Exit `index`'s output projection [d_model, vocab] in the compute dtype."""
  heads = model.exit_heads
  if heads.kind == 'own':
    return heads.projections[index][...].astype(model.precision.compute)
  return model.head_matrix()


def exit_logits(model, index: int, x_btd: jax.Array) -> jax.Array:
  """Logits of exit `index` from the raw residual stream after its layer, in the output dtype."""
  out = model.precision.output
  return jnp.einsum('btd,dv->btv', exit_norm(model, index, x_btd), exit_matrix(model, index),
                    preferred_element_type=out).astype(out)


# ---------------------------------------------------------------- the stack in pieces

def pieces(cfg, lo: int, hi: int) -> list[tuple]:
  """Blocks [lo, hi) as ('groups', g0, g1) runs of whole groups and ('blocks', g, b0, b1)."""
  per_group = len(parse_pattern(cfg.pattern))
  out, layer = [], lo
  while layer < hi:
    g, b = divmod(layer, per_group)
    if b == 0 and layer + per_group <= hi:
      g1 = hi // per_group
      out.append(('groups', g, g1))
      layer = g1 * per_group
    else:
      b1 = min(per_group, b + hi - layer)
      out.append(('blocks', g, b, b1))
      layer += b1 - b
  return out


def run_layers(model, x_btd: jax.Array, ctx: layers.Context, lo: int, hi: int):
  """Blocks [lo, hi) of the training forward: (x, per-layer MoE statistics stacked, or {})."""
  cfg = model.cfg

  def collect(fn, x):
    with moe.collect_stats() as per_layer:
      x = fn(x)
    return x, moe.stack_stats(per_layer)

  stats = []
  if cfg.scan_layers:
    graphdef, stacked = nnx.split(model.groups)
  for piece in pieces(cfg, lo, hi):
    if piece[0] == 'groups' and cfg.scan_layers:
      _, g0, g1 = piece

      def step(x, state):
        return collect(lambda y: nnx.merge(graphdef, state)(y, ctx), x)

      sliced = jax.tree.map(lambda p, a=g0, b=g1: p[a:b], stacked)
      x_btd, s = jax.lax.scan(remat.apply(step, cfg.remat_policy, in_scan=True), x_btd, sliced)
      stats.append({k: v.reshape((-1,) + v.shape[2:]) for k, v in s.items()})
      continue
    if piece[0] == 'groups':
      for g in range(piece[1], piece[2]):
        x_btd, s = remat.apply(lambda y, g=g: collect(lambda z: model.groups[g](z, ctx), y),
                               cfg.remat_policy, in_scan=False)(x_btd)
        stats.append(s)
      continue
    _, g, b0, b1 = piece
    group = (nnx.merge(graphdef, jax.tree.map(lambda p, g=g: p[g], stacked))
             if cfg.scan_layers else model.groups[g])

    def run_blocks(y, group=group, b0=b0, b1=b1):
      for block in list(group.blocks)[b0:b1]:
        y = block(y, ctx)
      return y

    x_btd, s = remat.apply(lambda y: collect(run_blocks, y), cfg.remat_policy, in_scan=False)(x_btd)
    stats.append(s)
  stats = [s for s in stats if s]
  return x_btd, ({k: jnp.concatenate([s[k] for s in stats]) for k in stats[0]} if stats else {})


def hidden_states(model, tokens_bt, positions_bt=None, segment_ids_bt=None):
  """(raw hidden state after each exit layer, final-normed features, summarised MoE stats)."""
  if positions_bt is None:
    positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
  ctx = layers.Context(positions=positions_bt, segment_ids=segment_ids_bt)
  x = model.embed(tokens_bt)
  bounds = (0, *parse_exit_layers(model.cfg), model.cfg.num_layers)
  exits, stats = [], []
  for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
    x, s = run_layers(model, x, ctx, lo, hi)
    if s:
      stats.append(s)
    if i < len(bounds) - 2:
      exits.append(x)
  stats = {k: jnp.concatenate([s[k] for s in stats]) for k in stats[0]} if stats else {}
  return exits, model.final_norm(x), moe.summarize(stats)


# ---------------------------------------------------------------- losses

def loss_weights(train_cfg, exits: tuple[int, ...], num_layers: int, step) -> tuple:
  """(per-exit weights [E], final-layer weight) at `step` (a traced scalar), float32.

  LayerSkip (Elhoushi et al. 2024) scales 0-indexed layer j by e_scale * sum_{i<=j} i (the final
  layer by L - 1 + e_scale * sum_{i<=L-2} i) and normalises over the layers switched on; an exit
  after l blocks is layer l - 1 there, so an exit after the first block gets weight 0, as in the
  paper. Constant and linear weights are added on top of the final loss (weight 1) unnormalised.
  """
  k = len(exits)
  step = jnp.asarray(step, jnp.float32)
  scale = float(train_cfg.exit_loss_scale)
  explicit = [float(w) for w in str(train_cfg.exit_loss_weights).split(',') if w.strip()]
  if explicit:
    base, final = jnp.asarray(explicit, jnp.float32), jnp.float32(1.0)
  elif train_cfg.exit_loss_schedule == 'constant':
    base, final = jnp.full((k,), scale, jnp.float32), jnp.float32(1.0)
  elif train_cfg.exit_loss_schedule == 'linear':
    base, final = jnp.asarray([scale * l / num_layers for l in exits], jnp.float32), 1.0
  else:  # layerskip
    base = jnp.asarray([scale * (l - 1) * l / 2 for l in exits], jnp.float32)
    final = jnp.float32(num_layers - 1 + scale * (num_layers - 2) * (num_layers - 1) / 2)
  idx = jnp.arange(k, dtype=jnp.float32)
  if train_cfg.exit_curriculum == 'rotational':
    period = float(train_cfg.exit_curriculum_period)
    on = (jnp.mod(idx, period) == jnp.mod(step, period)).astype(jnp.float32)
  elif train_cfg.exit_curriculum == 'gradual':
    total = float(train_cfg.exit_curriculum_steps or train_cfg.steps)
    on = (step >= total * (k - 1 - idx) / max(k, 1)).astype(jnp.float32)  # deepest first
  else:
    on = jnp.ones((k,), jnp.float32)
  weights = base * on
  final = jnp.asarray(final, jnp.float32)
  if not explicit and train_cfg.exit_loss_schedule == 'layerskip':
    norm = final + jnp.sum(weights)
    weights, final = weights / norm, final / norm
  return weights, final


def _chunks(a, chunk):
  b, t = a.shape[:2]
  return jnp.swapaxes(a.reshape(b, t // chunk, chunk, *a.shape[2:]), 0, 1)


def exit_losses(model, exit_hiddens, final_btd, targets_bt, weights_bt, *, chunk: int = 0,
                distill_temperature: float = 0.0) -> dict[str, jax.Array]:
  """Per exit, summed over tokens (float32, [E] each): 'ce', 'correct' and, with distillation, 'kl'.

  kl = T^2 * KL(softmax(final / T) || softmax(exit / T)) with the final layer's side held fixed.
  The head runs per sequence chunk of `chunk` positions (0 = the whole sequence) inside
  jax.checkpoint, so the backward pass recomputes a chunk's logits instead of storing them.
  """
  t = targets_bt.shape[1]
  chunk = chunk or t
  w_final = model.head_matrix()
  temp = float(distill_temperature)
  out = {'ce': [], 'correct': [], 'kl': []}
  for i, x in enumerate(exit_hiddens):
    xn, w = exit_norm(model, i, x), exit_matrix(model, i)

    @jax.checkpoint
    def body(carry, inputs, w=w):
      xe, xf, tg, wt = inputs
      logits = jnp.einsum('bcd,dv->bcv', xe, w, preferred_element_type=jnp.float32)
      lse = jax.nn.logsumexp(logits, axis=-1)
      ce = (lse - jnp.take_along_axis(logits, tg[..., None], axis=-1)[..., 0]) * wt
      correct = (jnp.argmax(logits, axis=-1) == tg).astype(jnp.float32) * wt
      kl = jnp.zeros_like(ce)
      if temp:
        teacher = jnp.einsum('bcd,dv->bcv', xf, w_final, preferred_element_type=jnp.float32)
        log_p = jax.lax.stop_gradient(jax.nn.log_softmax(teacher / temp, axis=-1))
        log_q = jax.nn.log_softmax(logits / temp, axis=-1)
        kl = temp ** 2 * jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1) * wt
      return (carry[0] + jnp.sum(ce), carry[1] + jnp.sum(correct), carry[2] + jnp.sum(kl)), None

    zero = jnp.zeros((), jnp.float32)
    (ce, correct, kl), _ = jax.lax.scan(
        body, (zero, zero, zero),
        (_chunks(xn, chunk), _chunks(jax.lax.stop_gradient(final_btd), chunk),
         _chunks(targets_bt, chunk), _chunks(weights_bt.astype(jnp.float32), chunk)))
    out['ce'].append(ce)
    out['correct'].append(correct)
    out['kl'].append(kl)
  return {k: jnp.stack(v) for k, v in out.items()} if exit_hiddens else {}


# ---------------------------------------------------------------- confidence and calibration

def confidence(kind: str, logits_bv: jax.Array, h_bd: jax.Array | None = None,
               h_prev_bd: jax.Array | None = None) -> jax.Array:
  """[B] float32, higher = more confident; a token exits when this is > the threshold.

  'softmax': the top-1 probability; 'margin': top-1 minus top-2 probability (CALM's softmax
  response and its gap); 'entropy': 1 - H(p) / log(tokens not masked to -inf); 'state': the cosine similarity of the
  hidden state with the one a layer earlier (CALM's state saturation).
  """
  if kind == 'state':
    a, b = h_bd.astype(jnp.float32), h_prev_bd.astype(jnp.float32)
    num = jnp.sum(a * b, axis=-1)
    return num / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12)
  probs = jax.nn.softmax(logits_bv.astype(jnp.float32), axis=-1)
  if kind == 'softmax':
    return jnp.max(probs, axis=-1)
  if kind == 'margin':
    top2 = jax.lax.top_k(probs, 2)[0]
    return top2[..., 0] - top2[..., 1]
  if kind == 'entropy':  # normalised by the tokens that can be drawn (finite logits)
    logp = jnp.log(jnp.maximum(probs, 1e-30))
    entropy = -jnp.sum(probs * logp, axis=-1)
    candidates = jnp.sum(jnp.isfinite(logits_bv), axis=-1).astype(jnp.float32)
    return 1.0 - entropy / jnp.log(jnp.maximum(candidates, 2.0))
  raise ValueError(f'infer.confidence={kind!r}: allowed values are {", ".join(CONFIDENCES)}')


def first_exit(conf_en: np.ndarray, threshold: float) -> np.ndarray:
  """Per token, the index of the first exit with confidence > threshold (E = none: full depth)."""
  over = np.asarray(conf_en) > threshold
  e = over.shape[0]
  return np.where(over.any(axis=0), np.argmax(over, axis=0), e)


def disagreement(conf_en: np.ndarray, agree_en: np.ndarray, threshold: float) -> float:
  """Fraction of tokens whose early-exit token differs from the full model's at this threshold."""
  chosen = first_exit(conf_en, threshold)
  agree = np.concatenate([np.asarray(agree_en, bool), np.ones((1, chosen.size), bool)])
  return float(1.0 - np.mean(agree[chosen, np.arange(chosen.size)]))


def calibrate_threshold(conf_en: np.ndarray, agree_en: np.ndarray, tolerance: float,
                        candidates=None) -> float:
  """The lowest candidate threshold at and above which disagreement stays <= tolerance.

  conf_en: each exit's confidence per held-out token; agree_en: whether that exit's greedy token
  equals the full model's. Candidates default to every observed confidence (and 1.0, never exit);
  walking down from the top, the first candidate that breaks the tolerance stops the walk, so
  the answer is safe for every threshold above it too (disagreement need not be monotone).
  """
  if candidates is None:
    candidates = np.unique(np.concatenate([np.asarray(conf_en).ravel(), [1.0]]))
  best = float(np.max(candidates))
  for threshold in sorted(candidates, reverse=True):
    if disagreement(conf_en, agree_en, threshold) > tolerance:
      break
    best = float(threshold)
  return best


def exit_statistics(model, tokens_bt, targets_bt, kind: str, vocab_limit: int | None = None):
  """Teacher-forced per-token numbers for calibration and studies, as float32 arrays.

  Returns {'confidence': [E, B, T], 'agree': [E, B, T] (exit argmax == final argmax),
  'exit_logprob': [E, B, T] and 'final_logprob': [B, T] of the target}. 'state' compares each
  exit's hidden state with the one a block earlier.
  """
  exits = parse_exit_layers(model.cfg)
  positions = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
  ctx = layers.Context(positions=positions, segment_ids=None)
  x = model.embed(tokens_bt)
  hiddens, previous = [], []
  layer = 0
  for lo in exits:
    if lo - 1 > layer:
      x, _ = run_layers(model, x, ctx, layer, lo - 1)
    prev = x
    x, _ = run_layers(model, x, ctx, lo - 1, lo)
    hiddens.append(x)
    previous.append(prev)
    layer = lo
  x, _ = run_layers(model, x, ctx, layer, model.cfg.num_layers)

  def mask(logits):
    logits = logits.astype(jnp.float32)
    if vocab_limit:
      logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
    return logits

  final = mask(jnp.einsum('btd,dv->btv', model.final_norm(x), model.head_matrix(),
                          preferred_element_type=jnp.float32))
  final_arg = jnp.argmax(final, axis=-1)
  logp = lambda lg: jnp.take_along_axis(jax.nn.log_softmax(lg, axis=-1), targets_bt[..., None],
                                        axis=-1)[..., 0]
  conf, agree, exit_lp = [], [], []
  for i, h in enumerate(hiddens):
    logits = mask(exit_logits(model, i, h))
    b, t, v = logits.shape
    c = confidence(kind, logits.reshape(b * t, v), h.reshape(b * t, -1),
                   previous[i].reshape(b * t, -1)).reshape(b, t)
    conf.append(c)
    agree.append(jnp.argmax(logits, axis=-1) == final_arg)
    exit_lp.append(logp(logits))
  return {'confidence': jnp.stack(conf), 'agree': jnp.stack(agree),
          'exit_logprob': jnp.stack(exit_lp), 'final_logprob': logp(final)}


def describe(cfg) -> dict[str, Any]:
  """A short summary for logs: exit layers and head kind."""
  return {'exit_layers': parse_exit_layers(cfg), 'exit_head': cfg.exit_head}
