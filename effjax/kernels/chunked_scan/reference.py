"""The chunked-scan op's specification: decayed linear attention, three equivalent forms.

Per batch row and head, with q_t, k_t [K], v_t [V], a log-decay g_t <= 0 and a state S [K, V]:

    S_t = a_t * exp(g_t) * S_{t-1} + k_t v_t^T        S_{-1} = initial_state (default 0)
    o_t = scale * q_t^T S_t                           final_state = S_{T-1}

where a_t = 0 when token t starts a new document (t > 0 and segment_ids[t] != segment_ids[t-1])
and 1 otherwise: the state resets at document boundaries, so packed documents never see each
other; token 0 continues the initial state. This one recurrence covers
  gated linear attention (GLA)  g data-dependent per head (a scalar per token and head);
  retention (RetNet)            g a fixed constant per head;
  linear attention              g = 0 (with a feature map applied to q and k by the caller);
  Mamba-2's SSD                 q = C, k = B, v = dt * x, g = dt * A.

Unrolled, with B_t = g_0 + ... + g_t (so B_i - B_j = g_{j+1} + ... + g_i <= 0 for j <= i):

    o_i = scale * [ sum_{j <= i, same document} exp(B_i - B_j) (q_i . k_j) v_j
                    + [no boundary in 1..i] exp(B_i) q_i^T S_init ]

`recurrent_reference` is the first form (a sequential scan; the decoding step), and
`quadratic_reference` the second (a [T, T] matrix); both are test oracles. The chunked form that
every backend computes is in chunked.py; `chunked_reference` there is this module's third form.
All math is float32; every exponent is a difference B_i - B_j with j <= i, never positive, so no
decay ever overflows however long the sequence (the log-space form).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def resets(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
  """bool [B, T]: True where a token starts a new document (never at t = 0)."""
  if segment_ids is None:
    return jnp.zeros((batch, length), bool)
  seg = jnp.asarray(segment_ids)
  return jnp.concatenate([jnp.zeros((batch, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)


def recurrent_step(state_bhkv: jax.Array, q_bhk: jax.Array, k_bhk: jax.Array, v_bhv: jax.Array,
                   g_bh: jax.Array, keep_b: jax.Array | None = None,
                   scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """One token: (o [B, H, V] float32, new state [B, H, K, V] float32). keep_b False resets."""
  decay = jnp.exp(g_bh.astype(jnp.float32))
  if keep_b is not None:
    decay = decay * keep_b.astype(jnp.float32)[:, None]
  kv = jnp.einsum('bhk,bhv->bhkv', k_bhk.astype(jnp.float32), v_bhv.astype(jnp.float32),
                  precision=_HIGHEST)
  state = decay[..., None, None] * state_bhkv + kv
  o = scale * jnp.einsum('bhk,bhkv->bhv', q_bhk.astype(jnp.float32), state, precision=_HIGHEST)
  return o, state


def recurrent_reference(q, k, v, log_decay, *, segment_ids=None, initial_state=None,
                        scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """The recurrence token by token: (o [B, T, H, V] float32, final state [B, H, K, V])."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  state = (jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None
           else initial_state.astype(jnp.float32))
  keep = ~resets(segment_ids, b, t)

  def step(state, xs):
    q_t, k_t, v_t, g_t, keep_t = xs
    o, state = recurrent_step(state, q_t, k_t, v_t, g_t, keep_t, scale)
    return state, o

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, log_decay, keep))
  state, o = jax.lax.scan(step, state, xs)
  return jnp.moveaxis(o, 0, 1), state


def quadratic_reference(q, k, v, log_decay, *, segment_ids=None, initial_state=None,
                        scale: float = 1.0) -> jax.Array:
  """The unrolled sum as an explicit [T, T] decay matrix: o [B, T, H, V] float32."""
  b, t, _, _ = q.shape
  cum_bth = jnp.cumsum(log_decay.astype(jnp.float32), axis=1)
  diff_bhij = cum_bth.transpose(0, 2, 1)[..., :, None] - cum_bth.transpose(0, 2, 1)[..., None, :]
  doc_bt = jnp.cumsum(resets(segment_ids, b, t), axis=1)  # document index of each token
  allowed_bij = (jnp.tril(jnp.ones((t, t), bool))[None] &
                 (doc_bt[:, :, None] == doc_bt[:, None, :]))
  decay_bhij = jnp.where(allowed_bij[:, None], jnp.exp(jnp.where(allowed_bij[:, None],
                                                                 diff_bhij, 0.0)), 0.0)
  scores = jnp.einsum('bihk,bjhk->bhij', q.astype(jnp.float32), k.astype(jnp.float32),
                      precision=_HIGHEST)
  o = jnp.einsum('bhij,bjhv->bihv', scores * decay_bhij, v.astype(jnp.float32),
                 precision=_HIGHEST)
  if initial_state is not None:
    carried_bth = jnp.where((doc_bt == 0)[..., None], jnp.exp(cum_bth), 0.0)
    o = o + carried_bth[..., None] * jnp.einsum('bthk,bhkv->bthv', q.astype(jnp.float32),
                                                initial_state.astype(jnp.float32),
                                                precision=_HIGHEST)
  return scale * o
