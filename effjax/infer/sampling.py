"""Token choice: greedy, temperature, top-k, top-p; and the speculative rejection rule.

`Sampler` turns logits into the distribution that is sampled (`probs`) and draws from it
(`sample`). Greedy (temperature 0) is the one-hot of the argmax, so every method that works on
distributions (the rejection rule below) reduces to exact greedy decoding with no special case.

The rejection rule (Leviathan et al. 2023; Chen et al. 2023): a token x drafted from q is kept
with probability min(1, p(x) / q(x)); when it is not, the replacement is drawn from
norm(max(0, p - q)). Whatever q is, the kept-or-replaced token is distributed exactly as p; when
all gamma drafts are kept, a bonus token is drawn from the target's next distribution. `verify`
applies it to a block of drafts for every sequence of a batch; `commit` keeps the batch in
lockstep (every sequence advances by the smallest accepted count plus one, each taking at that
index its own kept-or-replaced token, which is still exactly p-distributed: at that index the
accept/replace step ran whole, whatever the other sequences did).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampler:
  """temperature 0 = greedy; top_k 0 = off; top_p 1 = off; ids >= vocab_limit never drawn."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  vocab_limit: int = 0

  @property
  def greedy(self) -> bool:
    return self.temperature <= 0

  def filtered_logits(self, logits_v: jax.Array) -> jax.Array:
    """Float32 logits with the excluded tokens at -inf (temperature applied)."""
    logits_v = logits_v.astype(jnp.float32)
    vocab = logits_v.shape[-1]
    if self.vocab_limit and self.vocab_limit < vocab:
      logits_v = jnp.where(jnp.arange(vocab) < self.vocab_limit, logits_v, -jnp.inf)
    if self.greedy:
      return logits_v
    logits_v = logits_v / self.temperature
    if self.top_k and self.top_k < vocab:
      kth = jax.lax.top_k(logits_v, self.top_k)[0][..., -1:]
      logits_v = jnp.where(logits_v < kth, -jnp.inf, logits_v)
    if self.top_p < 1.0:
      sorted_v = jnp.sort(logits_v, axis=-1)[..., ::-1]
      probs = jax.nn.softmax(sorted_v, axis=-1)
      before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
      kept = jnp.where(before < self.top_p, sorted_v, jnp.inf)
      cutoff = jnp.min(kept, axis=-1, keepdims=True)  # the least likely token still kept
      logits_v = jnp.where(logits_v < cutoff, -jnp.inf, logits_v)
    return logits_v

  def probs(self, logits_v: jax.Array) -> jax.Array:
    """The distribution `sample` draws from, float32 (one-hot of the argmax when greedy)."""
    logits_v = self.filtered_logits(logits_v)
    if self.greedy:
      return jax.nn.one_hot(jnp.argmax(logits_v, axis=-1), logits_v.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(logits_v, axis=-1)

  def sample(self, logits_v: jax.Array, key: jax.Array) -> jax.Array:
    logits_v = self.filtered_logits(logits_v)
    if self.greedy:
      return jnp.argmax(logits_v, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits_v, axis=-1).astype(jnp.int32)


def sample_probs(probs_v: jax.Array, key: jax.Array) -> jax.Array:
  """A draw from explicit probabilities (zeros are never drawn)."""
  logp = jnp.where(probs_v > 0, jnp.log(jnp.maximum(probs_v, 1e-38)), -jnp.inf)
  return jax.random.categorical(key, logp, axis=-1).astype(jnp.int32)


def acceptance_probability(p_x: jax.Array, q_x: jax.Array) -> jax.Array:
  """min(1, p(x) / q(x)) for a token x drafted from q (so q(x) > 0)."""
  return jnp.minimum(1.0, p_x / jnp.maximum(q_x, 1e-38))


def residual(p_v: jax.Array, q_v: jax.Array) -> jax.Array:
  """norm(max(0, p - q)); p itself where that is all zero (p == q: a rejection cannot happen)."""
  r = jnp.maximum(p_v - q_v, 0.0)
  total = jnp.sum(r, axis=-1, keepdims=True)
  return jnp.where(total > 0, r / jnp.where(total > 0, total, 1.0), p_v)


def verify(p_bgv: jax.Array, q_bgv: jax.Array, drafts_bg: jax.Array,
           key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The rule on gamma drafts per sequence.

  p_bgv: the target's distributions [B, gamma + 1, V] (the last one follows every draft);
  q_bgv: the draft's [B, gamma, V]; drafts_bg: [B, gamma]. Returns (accepted [B]: the number of
  leading drafts kept, choice [B, gamma + 1]: at index i the kept draft or the replacement from
  the residual, at gamma a bonus draw from the last target distribution).
  """
  b, g = drafts_bg.shape
  k_accept, k_residual, k_bonus = jax.random.split(key, 3)
  take = lambda dist: jnp.take_along_axis(dist, drafts_bg[..., None], axis=-1)[..., 0]
  ratio = acceptance_probability(take(p_bgv[:, :g]), take(q_bgv))
  kept = jax.random.uniform(k_accept, (b, g)) < ratio
  accepted = jnp.sum(jnp.cumprod(kept.astype(jnp.int32), axis=1), axis=1)
  replacement = sample_probs(residual(p_bgv[:, :g], q_bgv), k_residual)
  bonus = sample_probs(p_bgv[:, g], k_bonus)
  choice = jnp.concatenate([jnp.where(kept, drafts_bg, replacement), bonus[:, None]], axis=1)
  return accepted, choice


def commit(drafts_bg: jax.Array, choice_bg1: jax.Array,
           accepted_b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(m, tokens [B, gamma + 1]): every sequence takes m + 1 = min(accepted) + 1 tokens.

  The first m are the drafts (kept by every sequence), index m is each sequence's own choice
  there; entries after m are junk the caller overwrites.
  """
  m = jnp.min(accepted_b)
  g = drafts_bg.shape[1]
  idx = jnp.arange(g + 1)
  padded = jnp.concatenate([drafts_bg, choice_bg1[:, -1:]], axis=1)
  return m, jnp.where(idx[None] < m, padded, choice_bg1)
