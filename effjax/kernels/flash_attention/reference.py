"""The attention op's specification in plain jnp: what every kernel backend must reproduce.

Float32 math on an explicit [S, S] mask. The mask ANDs four rules:
  causal       key j <= query i;
  window=w     i - w < j (causal: at most w keys ending at the query); |i - j| < w when not causal;
  segment_ids  same id for query and key, and key id > 0 (id 0 marks padding);
  layout       the block mask expanded to tokens (token i lies in block i // layout.block).
A query with no allowed key outputs exactly 0 and passes back a zero gradient. Grouped-query heads:
q head h reads kv head h // (Hq // Hkv).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effjax.kernels.flash_attention.layout import BlockLayout, token_mask

# The logsumexp every backend stores for a query with no allowed key. Finite, so no NaN can leak
# out of it, and so large that exp(score - lse) is exactly 0: the backward's recomputed
# probabilities, and with them all gradients of that row, vanish.
EMPTY_ROW_LSE = 1e30


def attention_mask(seq_len: int, *, segment_ids: jax.Array | None = None, causal: bool = True,
                   window: int | None = None, layout: BlockLayout | None = None) -> jax.Array:
  """bool [B or 1, 1, S, S]: True where query i may attend to key j."""
  mask_ss = jnp.asarray(token_mask(seq_len, causal=causal, window=window, layout=layout))
  mask_bss = mask_ss[None]
  if segment_ids is not None:
    seg_bs = jnp.asarray(segment_ids)
    same_bss = seg_bs[:, :, None] == seg_bs[:, None, :]
    mask_bss = mask_bss & same_bss & (seg_bs[:, None, :] > 0)
  return mask_bss[:, None]


def _scores_and_mask(q, k, *, segment_ids, causal, window, layout, scale):
  """Masked float32 scores [B, Hq, S, S] (masked entries finite) and the mask they used."""
  _, s, hq, d = q.shape
  hkv = k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  k_bshd = jnp.repeat(k, hq // hkv, axis=2)
  s_bhqk = jnp.einsum('bqhd,bkhd->bhqk', q.astype(jnp.float32), k_bshd.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST) * scale
  mask = attention_mask(s, segment_ids=segment_ids, causal=causal, window=window, layout=layout)
  # A finite fill keeps fully masked rows NaN-free; their probabilities are zeroed explicitly.
  return jnp.where(mask, s_bhqk, -1e30), mask


def attention_reference_with_lse(q, k, v, *, segment_ids=None, causal=True, window=None,
                                 layout=None, scale=None):
  """(out [B, S, Hq, D] in q.dtype, lse float32 [B, Hq, S]; EMPTY_ROW_LSE on keyless rows)."""
  s_bhqk, mask = _scores_and_mask(q, k, segment_ids=segment_ids, causal=causal, window=window,
                                  layout=layout, scale=scale)
  m_bhq = jax.lax.stop_gradient(jnp.max(s_bhqk, axis=-1, keepdims=True))
  p_bhqk = jnp.where(mask, jnp.exp(s_bhqk - m_bhq), 0.0)
  l_bhq = jnp.sum(p_bhqk, axis=-1, keepdims=True)
  empty = l_bhq == 0.0
  p_bhqk = p_bhqk / jnp.where(empty, 1.0, l_bhq)
  v_bshd = jnp.repeat(v, q.shape[2] // v.shape[2], axis=2).astype(jnp.float32)
  out = jnp.einsum('bhqk,bkhd->bqhd', p_bhqk, v_bshd, precision=jax.lax.Precision.HIGHEST)
  lse = jnp.where(empty, EMPTY_ROW_LSE, m_bhq + jnp.log(jnp.where(empty, 1.0, l_bhq)))[..., 0]
  return out.astype(q.dtype), lse


def attention_reference(q, k, v, *, segment_ids=None, causal=True, window=None, layout=None,
                        scale=None) -> jax.Array:
  """Softmax attention on q [B, S, Hq, D], k and v [B, S, Hkv, D] -> [B, S, Hq, D] (q.dtype)."""
  out, _ = attention_reference_with_lse(q, k, v, segment_ids=segment_ids, causal=causal,
                                        window=window, layout=layout, scale=scale)
  return out
