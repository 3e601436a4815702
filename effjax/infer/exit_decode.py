"""Early-exit decoding (CALM, Schuster et al. 2022): a token leaves at the first confident exit.

Each step runs the layers up to the first exit, asks that exit for its confidence
(effjax.models.early_exit.confidence) and, where it beats the threshold, emits the exit's token.
What the deeper layers do for a token that left at layer l: CALM's propagation. The exit's hidden
state h_l is copied up as the input of every deeper layer, which only writes its cache from it
(attention: the key and value of norm_j(h_l); recurrent mixers: the state advanced on
norm_j(h_l), since a recurrent state cannot skip a position) and skips its query, attention,
output projection and feed-forward, so later tokens attend to (or carry) an entry for every
position in every layer.

Shapes never change with the exit depth (one compilation). Per-sequence decisions in a batch:
  - every layer runs for the whole batch and rows that exited keep their frozen h_l
    (`Engine.run(keep_b=...)`): the rows' caches are filled exactly as above, but the batch pays
    full depth; this is the cost of different sequences leaving at different layers;
  - with infer.exit_skip (the default) each segment between exits is a `lax.cond`: when every
    row of the batch has exited, the deeper layers run only their cache fill. At batch 1 this is
    the real saving (per skipped attention:mlp layer, the key/value projections are ~1/6 of its
    weights: the rest is never read). The price is the conditional itself: on GPU its predicate
    is read back to the host once per segment and step (a few microseconds each).
Keys and values for skipped layers are written at once from the propagated state, not lazily
with the next full token: that keeps each step's work bounded and the cache complete at all times.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from effjax.infer.sampling import Sampler
from effjax.models import early_exit


@dataclasses.dataclass(frozen=True)
class ExitPolicy:
  """Exit when confidence > threshold (so 1.0 never exits); skip: the lax.cond above."""
  threshold: float = 0.9
  confidence: str = 'softmax'
  skip: bool = True


def step(engine, a, tokens_b, slot, start_b, caches, policy: ExitPolicy, sampler: Sampler, key):
  """One token per row at `slot`: (next tokens [B], exit index [B] (E = full depth), caches)."""
  exits = engine.exits
  bounds = (0, *exits, engine.num_layers)
  b = tokens_b.shape[0]
  x = engine.embed(a, tokens_b[:, None])
  exited = jnp.zeros((b,), bool)
  chosen = jnp.zeros((b,), jnp.int32)
  where = jnp.full((b,), len(exits), jnp.int32)
  keys = jax.random.split(key, len(exits) + 1)
  plain = dataclasses.replace(sampler, temperature=0.0)  # the vocabulary mask only
  state = policy.confidence == 'state'

  for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
    def full(x, caches, exited, lo=lo, hi=hi):
      x_prev = x
      if state and s < len(exits) and hi - lo > 1:
        x, caches, _ = engine.run(a, lo, hi - 1, x, slot, start_b, caches, keep_b=exited)
        x_prev, lo = x, hi - 1
      x, caches, _ = engine.run(a, lo, hi, x, slot, start_b, caches, keep_b=exited)
      return x, x_prev, caches

    def fill(x, caches, exited, lo=lo, hi=hi):
      del exited
      return x, x, engine.fill(a, lo, hi, x, slot, start_b, caches)

    if s > 0 and policy.skip:
      x, x_prev, caches = jax.lax.cond(jnp.all(exited), fill, full, x, caches, exited)
    else:
      x, x_prev, caches = full(x, caches, exited)
    if s == len(exits):
      break
    logits = engine.exit_head(a, s, x)[:, 0]
    conf = early_exit.confidence(policy.confidence, plain.filtered_logits(logits), x[:, 0],
                                 x_prev[:, 0])
    leave = ~exited & (conf > policy.threshold)
    chosen = jnp.where(leave, sampler.sample(logits, keys[s]), chosen)
    where = jnp.where(leave, s, where)
    exited = exited | leave
  final = sampler.sample(engine.head(a, x)[:, 0], keys[-1])
  return jnp.where(exited, chosen, final), where, caches
