"""Speculative decoding: draft gamma tokens cheaply, verify them in one pass of the full model.

Two drafters share one loop (`run_loop`):
  - self-speculative (LayerSkip, Elhoushi et al. 2024): the model's own first layers and an exit
    head draft. Those layers' caches are the full model's own, so the draft steps already wrote
    the first layers' keys and values of every drafted token, and verification runs only the
    remaining layers over the drafts' saved exit hidden states (one pass for gamma + 1 tokens);
  - a separate draft model (Leviathan et al. 2023; Chen et al. 2023) with its own caches, any
    config whose vocabulary matches; verification runs the whole target over the drafts.
Acceptance is the exact rejection rule (effjax.infer.sampling.verify): the output is distributed
as the target's sampling distribution, and under greedy decoding it equals plain greedy decoding
token for token. A batch advances in lockstep by min(accepted) + 1 (sampling.commit).

The sequence's last committed token is always pending (not yet in any cache); a round feeds it
and the drafts. Rolling back after a rejection: attention caches keep their entries, only the
position moves back (slots past it are masked and later overwritten; a sliding window's ring gets
gamma + 1 spare slots so that no rejected key overwrites one still in a later query's window);
recurrent mixers keep
their state after every token of the round (draft steps and the verification pass step token by
token) and take the one after the last accepted token, which costs gamma + 1 copies of the state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effjax.infer import engine as engine_lib
from effjax.infer import sampling
from effjax.infer.sampling import Sampler


def _recurrent(engine, caches, lo, hi):
  return {i: caches[i] for i in range(lo, hi) if not engine.is_attention[i]}


def _stack_snaps(per_step: dict, last: dict) -> dict:
  """Scan-stacked per-token caches [gamma, ...] plus the final fill step's -> [gamma + 1, ...]."""
  return {i: jax.tree.map(lambda s, l: jnp.concatenate([s, l[None]]), per_step[i], last[i])
          for i in per_step}


def draft_tokens(engine, a, hi: int, head, last_b, slot, start_b, caches, gamma: int,
                 sampler: Sampler, key):
  """gamma drafts from layers [0, hi) + `head`, then one more step writing the last draft.

  Returns (drafts [B, gamma], q [B, gamma, V], hidden [B, gamma + 1, D] after layer hi, caches,
  recurrent snapshots after each of the gamma + 1 fed tokens).
  """
  def one(carry, k):
    tok, caches = carry
    x, caches, _ = engine.run(a, 0, hi, engine.embed(a, tok[:, None]), slot + k[0], start_b,
                              caches)
    q = sampler.probs(head(x)[:, 0])
    d = sampling.sample_probs(q, k[1])
    return (d, caches), (d, q, x[:, 0], _recurrent(engine, caches, 0, hi))

  steps = (jnp.arange(gamma), jax.random.split(key, gamma))
  (d_last, caches), (drafts, q, hidden, snaps) = jax.lax.scan(one, (last_b, caches), steps)
  x, caches, _ = engine.run(a, 0, hi, engine.embed(a, d_last[:, None]), slot + gamma, start_b,
                            caches)
  hidden = jnp.concatenate([hidden, x[:, 0][None]])
  snaps = _stack_snaps(snaps, _recurrent(engine, caches, 0, hi))
  return (jnp.swapaxes(drafts, 0, 1), jnp.swapaxes(q, 0, 1), jnp.swapaxes(hidden, 0, 1), caches,
          snaps)


def run_loop(target, ta, tokens_bt, start_b, key, *, max_new: int, max_len: int, gamma: int,
             sampler: Sampler, stop_ids, padded: bool, draft=None, da=None,
             exit_index: int | None = None):
  """Generate up to max_new tokens per row; (tokens [B, max_new + gamma + 1], stats).

  draft/da: a separate draft Engine and its arrays; otherwise self-speculative with the exit
  `exit_index` of the target drafting. stats: accepted and drafted token counts, rounds.
  """
  b, t = tokens_bt.shape
  self_draft = draft is None
  t_caches = target.init_cache(b, max_len, ring_extra=gamma + 1)
  logits, _, t_caches = target.prefill(ta, tokens_bt, start_b, t_caches, padded)
  d_caches = None
  if not self_draft:
    d_caches = draft.init_cache(b, max_len, ring_extra=gamma + 1)
    _, _, d_caches = draft.prefill(da, tokens_bt, start_b, d_caches, padded)
  key, first_key = jax.random.split(key)
  first = sampler.sample(logits, first_key)
  return continue_loop(target, ta, t_caches, d_caches, first, jnp.int32(t), start_b, key,
                       max_new=max_new, gamma=gamma, sampler=sampler, stop_ids=stop_ids,
                       draft=draft, da=da, exit_index=exit_index)


def continue_loop(target, ta, t_caches, d_caches, first_b, slot, start_b, key, *, max_new: int,
                  gamma: int, sampler: Sampler, stop_ids, draft=None, da=None,
                  exit_index: int | None = None):
  """run_loop's rounds from filled caches, `first_b` pending at `slot` (benchmarks start here)."""
  b = first_b.shape[0]
  self_draft = draft is None
  layer = target.exits[exit_index] if self_draft else None
  buf = jnp.zeros((b, max_new + gamma + 1), jnp.int32).at[:, 0].set(first_b)
  stop = jnp.asarray(stop_ids, jnp.int32)
  done = jnp.isin(first_b, stop)
  zero = jnp.zeros((), jnp.int32)
  carry = (jnp.int32(1), first_b, slot, t_caches, d_caches, done, buf, zero, zero, zero)

  def cond(c):
    return (c[0] < max_new) & ~jnp.all(c[5])

  def body(c):
    count, last, slot, t_caches, d_caches, done, buf, acc, drafted, rounds = c
    k_draft, k_verify = jax.random.split(jax.random.fold_in(key, rounds))
    if self_draft:
      head = lambda x: target.exit_head(ta, exit_index, x)
      drafts, q, hidden, t_caches, d_snaps = draft_tokens(
          target, ta, layer, head, last, slot, start_b, t_caches, gamma, sampler, k_draft)
      x, t_caches, v_snaps = target.run(ta, layer, target.num_layers, hidden, slot, start_b,
                                        t_caches, snapshots=True)
    else:
      head = lambda x: draft.head(da, x)
      drafts, q, _, d_caches, d_snaps = draft_tokens(
          draft, da, draft.num_layers, head, last, slot, start_b, d_caches, gamma, sampler,
          k_draft)
      fed = jnp.concatenate([last[:, None], drafts], axis=1)
      x, t_caches, v_snaps = target.run(ta, 0, target.num_layers, target.embed(ta, fed), slot,
                                        start_b, t_caches, snapshots=True)
    p = sampler.probs(target.head(ta, x))
    accepted, choice = sampling.verify(p, q, drafts, k_verify)
    m, chunk = sampling.commit(drafts, choice, accepted)
    t_caches = engine_lib.rollback(t_caches, v_snaps, m)
    if self_draft:
      t_caches = engine_lib.rollback(t_caches, d_snaps, m)
    else:
      d_caches = engine_lib.rollback(d_caches, d_snaps, m)
    buf = jax.lax.dynamic_update_slice(buf, chunk, (0, count))
    valid = jnp.arange(gamma + 1)[None] <= m
    live = ~done
    done = done | jnp.any(jnp.isin(chunk, stop) & valid, axis=1)
    acc = acc + jnp.sum(jnp.where(live, accepted, 0))
    drafted = drafted + gamma * jnp.sum(live.astype(jnp.int32))
    last = jnp.take_along_axis(chunk, jnp.broadcast_to(m, (b, 1)), axis=1)[:, 0]
    return (count + m + 1, last, slot + m + 1, t_caches, d_caches, done, buf, acc, drafted,
            rounds + 1)

  out = jax.lax.while_loop(cond, body, carry)
  return out[6], {'accepted': out[7], 'drafted': out[8], 'rounds': out[9], 'tokens': out[0]}
