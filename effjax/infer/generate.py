"""Sampling from a trained model: temperature and top-k over the full-context forward pass.

This path recomputes the whole context for each new token inside one jitted loop (compiled once
per prompt length and budget); it is the reference for the cached decoders, which return the same
tokens at a fraction of the cost.
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


def generate_text(graphdef: Any, params: Any, tokenizer, prompt: str, max_new_tokens: int, *,
                  temperature: float = 0.8, top_k: int = 40, seed: int = 0) -> str:
  """Prompt text -> prompt + continuation, cut at the first end-of-document token."""
  prompt_ids = [tokenizer.bos_id] + list(tokenizer.encode(prompt))
  new = generate_tokens(graphdef, params, prompt_ids, max_new_tokens, temperature=temperature,
                        top_k=top_k, seed=seed, vocab_limit=tokenizer.vocab_size)
  if tokenizer.eos_id in new:
    new = new[:new.index(tokenizer.eos_id)]
  return prompt + tokenizer.decode(new)
