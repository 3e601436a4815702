"""The language model: token embedding, a layer stack built from the config pattern, output head.

The pattern (say 'attention:mlp, attention:mlp') is one *group*; it repeats num_layers/len(pattern)
times. With `scan_layers` the groups' parameters are stacked on a leading 'layers' axis and the
stack is one `lax.scan` (compile time independent of depth), each step rematerialised by the
configured policy.

Decoding with a key/value cache: `init_cache` allocates one cache per block (stacked over groups
like the parameters when scanned), `prefill` runs the prompt through the stack and fills them,
`decode` advances every layer by one token. Each mixer provides the same three methods
(effjax.models.attention).

Mixture-of-experts layers report router statistics (effjax.models.moe): each group's are collected
while it runs and returned beside its output, so they pass through the scan and remat like any
other output; `logits_and_stats` hands them, summarised over layers, to the training loss.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

# Importing the part modules registers them.
from effjax.models import attention as _attention  # noqa: F401
from effjax.models import linear_attention as _linear_attention  # noqa: F401
from effjax.models import ssm as _ssm  # noqa: F401
from effjax.models import mlp as _mlp  # noqa: F401
from effjax.models import early_exit, layers, moe, remat
from effjax.models.norms import RMSNorm
from effjax.models.registry import FEED_FORWARDS, MIXERS, parse_pattern
from effjax.parallel.sharding import constrain

ACT_BTD = ('act_batch', 'act_length', 'act_embed')


class Block(nnx.Module):
  """Pre-norm residual block: x + mixer(norm(x)), then x + feed_forward(norm(x)).

  The feed-forward 'none' leaves the second half out (and its norm): a pure Mamba stack is
  'mamba2:none'.
  """

  def __init__(self, cfg, mixer: str, feed_forward: str, *, rngs: nnx.Rngs):
    prec = layers.Precision.from_config(cfg)
    norm = dict(eps=cfg.norm_eps, param_dtype=prec.param, compute_dtype=prec.compute)
    self.mixer_norm = RMSNorm(cfg.d_model, **norm)
    self.mixer = MIXERS.get(mixer)(cfg, rngs=rngs)
    self.has_ff = feed_forward != 'none'
    if self.has_ff:
      self.ff_norm = RMSNorm(cfg.d_model, **norm)
      self.ff = FEED_FORWARDS.get(feed_forward)(cfg, rngs=rngs)

  def _feed_forward(self, x_btd: jax.Array, ctx: layers.Context) -> jax.Array:
    return x_btd + self.ff(self.ff_norm(x_btd), ctx) if self.has_ff else x_btd

  def __call__(self, x_btd: jax.Array, ctx: layers.Context) -> jax.Array:
    x_btd = x_btd + self.mixer(self.mixer_norm(x_btd), ctx)
    x_btd = constrain(self._feed_forward(x_btd, ctx), ACT_BTD)
    return checkpoint_name(x_btd, 'block_out')

  def prefill(self, x_btd: jax.Array, ctx: layers.Context, cache: Any) -> tuple[jax.Array, Any]:
    y, cache = self.mixer.prefill(self.mixer_norm(x_btd), ctx, cache)
    return self._feed_forward(x_btd + y, ctx), cache

  def decode(self, x_b1d: jax.Array, position: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
    y, cache = self.mixer.decode(self.mixer_norm(x_b1d), position, cache)
    ctx = layers.Context(positions=jnp.full(x_b1d.shape[:2], position, jnp.int32),
                         segment_ids=None)
    return self._feed_forward(x_b1d + y, ctx), cache


class Group(nnx.Module):
  """One repetition of the pattern."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.blocks = nnx.List(
        [Block(cfg, mixer, ff, rngs=rngs) for mixer, ff in parse_pattern(cfg.pattern)])

  def __call__(self, x_btd: jax.Array, ctx: layers.Context) -> jax.Array:
    for block in self.blocks:
      x_btd = block(x_btd, ctx)
    return x_btd

  def init_cache(self, batch: int, max_len: int, dtype=None) -> tuple:
    for block in self.blocks:
      if not hasattr(block.mixer, 'decode'):
        raise ValueError(f'mixer {type(block.mixer).__name__} has no cached decoding; use '
                         'effjax.infer.generate.generate_tokens (full recompute) instead')
    return tuple(block.mixer.init_cache(batch, max_len, dtype) for block in self.blocks)

  def prefill(self, x_btd: jax.Array, ctx: layers.Context, caches: tuple):
    out = []
    for block, cache in zip(self.blocks, caches):
      x_btd, cache = block.prefill(x_btd, ctx, cache)
      out.append(cache)
    return x_btd, tuple(out)

  def decode(self, x_b1d: jax.Array, position: jax.Array, caches: tuple):
    out = []
    for block, cache in zip(self.blocks, caches):
      x_b1d, cache = block.decode(x_b1d, position, cache)
      out.append(cache)
    return x_b1d, tuple(out)


def num_groups(cfg) -> int:
  blocks = len(parse_pattern(cfg.pattern))
  if cfg.num_layers % blocks:
    raise ValueError(f'model.num_layers={cfg.num_layers} is not a multiple of the {blocks} blocks '
                     f'in model.pattern={cfg.pattern!r}')
  return cfg.num_layers // blocks


class LM(nnx.Module):
  """Decoder-only language model; __call__ maps tokens [B, T] to logits [B, T, vocab]."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    cfg = self.cfg = ml_collections.FrozenConfigDict(cfg)  # hashable: part of the graphdef
    prec = self.precision = layers.Precision.from_config(cfg)
    self.embedding = layers.normal_param(rngs, (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'),
                                         cfg.init_std, prec.param)
    n = num_groups(cfg)
    if cfg.scan_layers:
      @nnx.split_rngs(splits=n)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
      def make_groups(rngs):
        return Group(cfg, rngs=rngs)
      self.groups = make_groups(rngs)
    else:
      self.groups = nnx.List([Group(cfg, rngs=rngs) for _ in range(n)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=prec.param,
                              compute_dtype=prec.compute)
    if not cfg.tie_embeddings:
      self.unembedding = layers.normal_param(rngs, (cfg.d_model, cfg.vocab_size),
                                             ('embed', 'vocab'), cfg.init_std, prec.param)
    if early_exit.parse_exit_layers(cfg):  # heads after intermediate layers (early_exit.py)
      self.exit_heads = early_exit.ExitHeads(cfg, rngs=rngs)

  def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None,
               segment_ids_bt: jax.Array | None = None) -> jax.Array:
    return self.logits_and_stats(tokens_bt, positions_bt, segment_ids_bt)[0]

  def logits_and_stats(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None,
                       segment_ids_bt: jax.Array | None = None) -> tuple[jax.Array, moe.Stats]:
    """Logits and the MoE layers' summarised statistics (moe.summarize; {} without MoE)."""
    x, stats = self.features_and_stats(tokens_bt, positions_bt, segment_ids_bt)
    logits = head_logits(x, self.head_matrix(), self.precision.output)
    return constrain(logits, ('act_batch', 'act_length', 'act_vocab')), stats

  def head_matrix(self) -> jax.Array:
    """The output projection [d_model, vocab] in the compute dtype."""
    head = self.embedding[...].T if self.cfg.tie_embeddings else self.unembedding[...]
    return head.astype(self.precision.compute)

  def features(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None,
               segment_ids_bt: jax.Array | None = None) -> jax.Array:
    """The final-normed hidden states [B, T, d_model] that the head turns into logits.

    Split from __call__ so a loss can apply the head in chunks without ever materialising the
    full [B, T, vocab] logits (effjax.train.losses.chunked_cross_entropy).
    """
    return self.features_and_stats(tokens_bt, positions_bt, segment_ids_bt)[0]

  def features_and_stats(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None,
                         segment_ids_bt: jax.Array | None = None) -> tuple[jax.Array, moe.Stats]:
    """`features` and the summarised MoE statistics ({} when no block is a MoE)."""
    cfg = self.cfg
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
    ctx = layers.Context(positions=positions_bt, segment_ids=segment_ids_bt)
    x = self.embed(tokens_bt)

    def run(group, x_btd):  # the group's output and its MoE layers' statistics, layer-stacked
      with moe.collect_stats() as per_layer:
        x_btd = group(x_btd, ctx)
      return x_btd, moe.stack_stats(per_layer)

    if cfg.scan_layers:
      graphdef, stacked = nnx.split(self.groups)

      def step(x_btd, group_state):
        return run(nnx.merge(graphdef, group_state), x_btd)

      x, stats = jax.lax.scan(remat.apply(step, cfg.remat_policy, in_scan=True), x, stacked)
      stats = {k: v.reshape((-1,) + v.shape[2:]) for k, v in stats.items()}
    else:
      per_group = []
      for group in self.groups:
        x, group_stats = remat.apply(lambda x_btd, g=group: run(g, x_btd), cfg.remat_policy,
                                     in_scan=False)(x)
        per_group.append(group_stats)
      stats = {k: jnp.concatenate([s[k] for s in per_group]) for k in per_group[0]}
    return self.final_norm(x), moe.summarize(stats)

  def embed(self, tokens_bt: jax.Array) -> jax.Array:
    # Gather from a replicated table: the all-gather FSDP would do anyway, and a gather from a
    # vocab-sharded table makes XLA's partitioner fall back to full rematerialisation.
    table = constrain(self.embedding[...], (None, None))
    x = jnp.take(table, tokens_bt, axis=0).astype(self.precision.compute)
    return constrain(x, ACT_BTD)

  # ---------------------------------------------------------------- cached decoding

  def supports_cache(self) -> bool:
    """Whether every mixer of the pattern implements init_cache / prefill / decode."""
    return all(hasattr(MIXERS.get(mixer), 'decode') for mixer, _ in parse_pattern(self.cfg.pattern))

  def init_cache(self, batch: int, max_len: int, dtype=None) -> Any:
    """Zeroed key/value caches for `batch` sequences of up to max_len tokens (compute dtype)."""
    if not self.cfg.scan_layers:
      return tuple(g.init_cache(batch, max_len, dtype) for g in self.groups)
    graphdef, stacked = nnx.split(self.groups)
    # Shapes depend on the config alone: build one group's caches and stack them per group.
    one = nnx.merge(graphdef, jax.tree.map(lambda p: p[0], stacked)).init_cache(batch, max_len,
                                                                                dtype)
    return jax.tree.map(lambda c: jnp.zeros((num_groups(self.cfg),) + c.shape, c.dtype), one)

  def _run_stack(self, method: str, x: jax.Array, *args) -> tuple[jax.Array, Any]:
    """Every group's `method`(x, *args[:-1], its cache) in depth order; args[-1] = the caches."""
    *extra, caches = args
    if self.cfg.scan_layers:
      graphdef, stacked = nnx.split(self.groups)

      def step(x, inputs):
        state, cache = inputs
        return getattr(nnx.merge(graphdef, state), method)(x, *extra, cache)

      return jax.lax.scan(step, x, (stacked, caches))
    out = []
    for group, cache in zip(self.groups, caches):
      x, cache = getattr(group, method)(x, *extra, cache)
      out.append(cache)
    return x, tuple(out)

  def prefill(self, tokens_bt: jax.Array, caches: Any) -> tuple[jax.Array, Any]:
    """Logits [B, T, vocab] of a prompt at positions 0..T-1, and the caches holding it."""
    positions = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
    ctx = layers.Context(positions=positions, segment_ids=None)
    x, caches = self._run_stack('prefill', self.embed(tokens_bt), ctx, caches)
    return head_logits(self.final_norm(x), self.head_matrix(), self.precision.output), caches

  def decode(self, tokens_b: jax.Array, position: jax.Array, caches: Any) -> tuple[jax.Array, Any]:
    """Logits [B, vocab] after token tokens_b at `position` (all earlier ones cached).

    position is one scalar for the batch and must stay below the caches' max_len (under jit an
    out-of-range write is clamped, not reported).
    """
    x, caches = self._run_stack('decode', self.embed(tokens_b[:, None]), position, caches)
    logits = head_logits(self.final_norm(x), self.head_matrix(), self.precision.output)
    return logits[:, 0], caches


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def head_logits(x_btd: jax.Array, w_dv: jax.Array, out_dtype) -> jax.Array:
  """x @ w accumulated and returned in out_dtype; its derivatives run in x's dtype.

  With float32 logits from bfloat16 operands, plain autodiff would hand the two backward matmuls
  a float32 cotangent [tokens, vocab], and XLA then runs them as float32 (tf32) GEMMs: on an H200
  that was 17 ms of a 93 ms GPT-2-small step. Here the tangent is formed in the compute dtype and
  only then cast to out_dtype, so its transpose casts the cotangent down first (what mixed
  precision does for every other matmul): the loss sees float32 logits, the gradient matmuls run
  on the bf16 tensor cores. A custom JVP rather than a custom VJP, so forward-mode (the
  Hessian-vector products of Sophia-H) works through it too.
  """
  return jnp.einsum('btd,dv->btv', x_btd, w_dv, preferred_element_type=out_dtype).astype(out_dtype)


@head_logits.defjvp
def _head_logits_jvp(out_dtype, primals, tangents):
  x_btd, w_dv = primals
  tx_btd, tw_dv = tangents
  tangent = jnp.einsum('btd,dv->btv', tx_btd, w_dv) + jnp.einsum('btd,dv->btv', x_btd, tw_dv)
  return head_logits(x_btd, w_dv, out_dtype), tangent.astype(out_dtype)


def block_kinds(cfg) -> list[tuple[str, str]]:
  """Every (mixer, feed-forward) of the full depth, in order."""
  return list(parse_pattern(cfg.pattern)) * num_groups(cfg)


def count_params(cfg, include_embedding: bool = True, active: bool = False) -> int:
  """Parameter count from the config alone (matches the built model; tested).

  active=True counts only the parameters one token runs through: a part that routes (MoE) says
  so with an `active_params(cfg)`; every other part is active whole.
  """
  total = 0
  for mixer, ff in block_kinds(cfg):
    ff_cls = FEED_FORWARDS.get(ff)
    ff_params = getattr(ff_cls, 'active_params', ff_cls.num_params) if active else ff_cls.num_params
    total += MIXERS.get(mixer).num_params(cfg) + ff_params(cfg)
    total += (2 if ff != 'none' else 1) * cfg.d_model  # the block's norms
  total += cfg.d_model  # final norm
  embedding = cfg.vocab_size * cfg.d_model
  exits = len(early_exit.parse_exit_layers(cfg))
  if exits and cfg.exit_head in ('norm', 'own'):  # the exits' own norms and projections
    total += exits * (cfg.d_model + (embedding if cfg.exit_head == 'own' else 0))
  if include_embedding:
    total += embedding
  if not cfg.tie_embeddings:
    total += embedding
  return total
