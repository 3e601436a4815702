"""Sampling from a trained model: temperature and top-k, with or without a key/value cache.

`generate_tokens` recomputes the whole context for each new token inside one jitted loop
(compiled once per prompt length and budget): O(T^2) work per token, but it needs nothing of the
mixers beyond their forward pass, so it is the reference. `generate_tokens_cached` runs the prompt
once (prefill), then one jitted loop of single-token decode steps against each layer's key/value
cache (effjax.models.lm.LM.decode). Both draw from the same key sequence, so they return the same
tokens; `generate_text` uses the cached one.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def sample_logits(logits_v: jax.Array, key: jax.Array, temperature: float, top_k: int) -> jax.Array:
  logits_v = logits_v.astype(jnp.float32)
  if temperature <= 0:
    return jnp.argmax(logits_v, axis=-1)
  logits_v = logits_v / temperature
  if top_k and top_k < logits_v.shape[-1]:
    kth = jax.lax.top_k(logits_v, top_k)[0][..., -1:]
    logits_v = jnp.where(logits_v < kth, -jnp.inf, logits_v)
  return jax.random.categorical(key, logits_v, axis=-1)


def generate_tokens(graphdef: Any, params: Any, prompt_ids: list[int], max_new_tokens: int, *,
                    temperature: float, top_k: int, seed: int, vocab_limit: int) -> list[int]:
  """Continue `prompt_ids` by max_new_tokens sampled tokens; ids >= vocab_limit are never drawn."""
  total = len(prompt_ids) + max_new_tokens
  buffer = jnp.zeros((1, total), jnp.int32).at[0, :len(prompt_ids)].set(jnp.asarray(prompt_ids))

  @jax.jit
  def run(params, buffer, key):
    model = nnx.merge(graphdef, params)

    def body(pos, carry):
      buf, key = carry
      key, sub = jax.random.split(key)
      logits = model(buf)[0, pos - 1]
      logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
      token = sample_logits(logits, sub, temperature, top_k)
      return buf.at[0, pos].set(token.astype(jnp.int32)), key

    buf, _ = jax.lax.fori_loop(len(prompt_ids), total, body, (buffer, key))
    return buf

  out = jax.device_get(run(params, buffer, jax.random.key(seed)))
  return [int(t) for t in out[0, len(prompt_ids):]]


def generate_tokens_cached(graphdef: Any, params: Any, prompt_ids: list[int], max_new_tokens: int,
                           *, temperature: float, top_k: int, seed: int,
                           vocab_limit: int) -> list[int]:
  """generate_tokens through the key/value cache: one prefill, then one decode step per token."""
  prompt_len = len(prompt_ids)
  total = prompt_len + max_new_tokens
  prompt = jnp.asarray(prompt_ids, jnp.int32)[None]

  @jax.jit
  def run(params, prompt, key):
    model = nnx.merge(graphdef, params)

    def draw(logits_v, key):
      logits_v = jnp.where(jnp.arange(logits_v.shape[-1]) < vocab_limit, logits_v, -jnp.inf)
      key, sub = jax.random.split(key)
      return sample_logits(logits_v, sub, temperature, top_k).astype(jnp.int32), key

    logits, cache = model.prefill(prompt, model.init_cache(1, total))
    token, key = draw(logits[0, -1], key)
    buf = jnp.zeros((total,), jnp.int32).at[:prompt_len].set(prompt[0]).at[prompt_len].set(token)

    def body(pos, carry):  # the token at pos from the logits after the token at pos - 1
      buf, cache, key = carry
      logits, cache = model.decode(buf[pos - 1][None], pos - 1, cache)
      token, key = draw(logits[0], key)
      return buf.at[pos].set(token), cache, key

    buf, _, _ = jax.lax.fori_loop(prompt_len + 1, total, body, (buf, cache, key))
    return buf

  out = jax.device_get(run(params, prompt, jax.random.key(seed)))
  return [int(t) for t in out[prompt_len:]]


def generate_text(graphdef: Any, params: Any, tokenizer, prompt: str, max_new_tokens: int, *,
                  temperature: float = 0.8, top_k: int = 40, seed: int = 0,
                  cached: bool = True) -> str:
  """Prompt text -> prompt + continuation, cut at the first end-of-document token.

  cached=False recomputes the full context per token (the reference path), as does a model
  with a mixer that has no cached decoding.
  """
  prompt_ids = [tokenizer.bos_id] + list(tokenizer.encode(prompt))
  cached = cached and nnx.merge(graphdef, params).supports_cache()
  generate = generate_tokens_cached if cached else generate_tokens
  new = generate(graphdef, params, prompt_ids, max_new_tokens, temperature=temperature,
                 top_k=top_k, seed=seed, vocab_limit=tokenizer.vocab_size)
  if tokenizer.eos_id in new:
    new = new[:new.index(tokenizer.eos_id)]
  return prompt + tokenizer.decode(new)
