"""What the decode-attention kernel computes, in plain JAX.

A few new queries per sequence against a key/value cache, as a decoding step (n = 1) or a
speculative verification pass (n = gamma + 1) needs it:

  q      [B, n, Hq, D]   the new tokens' queries (after the rotary embedding);
  k, v   [B, L, Hkv, D]  the cache, the new tokens' keys and values already written at slots
                         slot .. slot + n - 1; query head h reads key/value head h // (Hq / Hkv);
  start  [B] int32       the first slot sequence b uses (its prompt is left-padded to a common
                         length, so the slots before start_b are padding);
  slot   int32 scalar    the slot of the first new token.

Query i of sequence b sees the keys at slots j with start_b <= j <= slot + i (its own key
included, so every query sees at least one). Scores are q.k / sqrt(D) accumulated in float32
from the cache's dtype, the softmax is taken in float32 and the output is in q's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def allowed_slots(start_b: jax.Array, slot: jax.Array, n: int, length: int) -> jax.Array:
  """[B, n, L] True where query i of sequence b may see cache slot j."""
  keys = jnp.arange(length)
  limit = jnp.asarray(slot, jnp.int32) + jnp.arange(n)
  return (keys[None, None] >= start_b[:, None, None]) & (keys[None, None] <= limit[None, :, None])


def decode_attention_reference(q_bnhd: jax.Array, k_blkd: jax.Array, v_blkd: jax.Array,
                               start_b: jax.Array, slot: jax.Array) -> jax.Array:
  b, n, heads, d = q_bnhd.shape
  length, kv_heads = k_blkd.shape[1], k_blkd.shape[2]
  q = q_bnhd.reshape(b, n, kv_heads, heads // kv_heads, d)
  s = jnp.einsum('bnkgd,blkd->bkgnl', q.astype(k_blkd.dtype), k_blkd,
                 preferred_element_type=jnp.float32) * d ** -0.5
  mask = allowed_slots(start_b, slot, n, length)
  s = jnp.where(mask[:, None, None], s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  out = jnp.einsum('bkgnl,blkd->bnkgd', p.astype(v_blkd.dtype), v_blkd,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, n, heads, d).astype(q_bnhd.dtype)
