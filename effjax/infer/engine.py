"""The decoding engine: a trained LM prepared for fast cached decoding, layer by layer.

`Engine(graphdef, params)` unstacks a scanned layer stack into one parameter set per layer (so
any range of layers can run alone: an early exit, a self-speculative draft), casts the weights
once to the decoding dtype (`infer.weights_dtype`, the compute dtype by default: the matmuls run
on exactly the values training used, and each step reads half the bytes of float32 weights),
stores the weights named in `output_major` (infer.output_major) transposed so that a one-row
product reduces along their minor axes, and checks that every mixer can decode with a cache.
With `vocab_limit` (the tokenizer's size, which `Decoder` passes) the output heads keep only the
rows of ids that can be drawn.
Everything below is traced inside one jit by the callers (effjax/infer/generate.py,
speculative.py, exit_decode.py); the arrays live in `engine.arrays` and are passed in as
arguments, never closed over.

Batches of prompts of different lengths are left-padded to one length T: every sequence then
writes cache slot s at the same step, and sequence b's tokens sit at slots start_b..; its
positions (rotary phases) are slot - start_b, so each decodes exactly as it would alone. The
prefill keeps padding out with segment ids (padding = 0) and zeroes the padding's hidden
states after every block (they are never attended to, and stay finite); decoding masks the
cache slots before start_b.

`run(lo, hi, x [B, n, D], slot, ...)` advances layers lo..hi-1 by n tokens written at slots
slot..slot+n-1: n = 1 is a decode step, n > 1 the speculative verification pass. Attention
kinds attend over the cache in place (the full cache is written first and read once; the
sliding window's ring attends to its old slots and the n new keys separately, since a new key
may overwrite a slot an earlier query of the same pass still needs). Recurrent mixers step
token by token inside the pass and can return the state after each token, which is how a
rejected speculation is rolled back (attention caches need no rollback: a slot past the
accepted position is masked and later overwritten). `fill` writes a token's keys and values
(or advances a recurrent state) without the rest of the block: an early-exited token's deeper
layers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from effjax.compress import weights as w_lib
from effjax.kernels import decode_attention as decode_kernel
from effjax.models import attention, early_exit, layers, mlp, norms, rope
from effjax.models.lm import block_kinds, num_groups
from effjax.models.registry import parse_pattern


def _cast(path, x, dtype):
  """Float weights (2+ axes) in the decode dtype; vectors and quantized weights' scales as they
  are (a bf16 scale would round every output channel by up to 0.4%)."""
  names = {str(getattr(k, 'key', getattr(k, 'name', ''))) for k in path}
  if x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating) and not names & w_lib.QUANT_SCALE_NAMES:
    return x.astype(dtype)
  return x


class Engine:
  """A model prepared for decoding: per-layer graphdefs (static) and weights (`arrays`)."""

  def __init__(self, graphdef: Any, params: Any, weights_dtype: str = '',
               attention_kernel: str = 'auto', attention_interpret: bool = False,
               vocab_limit: int = 0, output_major: tuple[str, ...] = w_lib.DECODE_OUTPUT_MAJOR,
               qmm_output_major: tuple[str, ...] = (), cache_write_in_kernel: bool = True,
               output_major_kernel: str = '', fold_norms: bool = False,
               attention_tiling: str = ''):
    model = nnx.merge(graphdef, params)  # new module objects: the caller's model is untouched
    w_lib.output_major(model, tuple(output_major), quantized=tuple(qmm_output_major),
                       kernel=output_major_kernel)
    decode_kernel.resolve_backend(attention_kernel)  # a bad name fails here, not when traced
    decode_kernel.parse_tiling(attention_tiling)  # likewise a bad tiling
    # attend()'s kernel settings; cache_write_in_kernel (infer.cache_write_in_kernel): where the
    # decode-attention kernel runs, it writes the new keys and values into the cache itself;
    # attention_tiling (infer.decode_attention_tiling): its tiling, '' for the default.
    self.attention = (attention_kernel, attention_interpret, cache_write_in_kernel,
                      attention_tiling)
    cfg = self.cfg = model.cfg
    self.compute_dtype = jnp.dtype(cfg.compute_dtype)
    self.output_dtype = jnp.dtype(cfg.output_dtype)
    dtype = jnp.dtype(weights_dtype) if weights_dtype else self.compute_dtype
    self.kinds = [mixer for mixer, _ in block_kinds(cfg)]
    per_group = len(parse_pattern(cfg.pattern))
    blocks = []
    if cfg.scan_layers:
      group_def, stacked = nnx.split(model.groups)
      for g in range(num_groups(cfg)):
        group = nnx.merge(group_def, jax.tree.map(lambda p, g=g: p[g], stacked))
        blocks.extend(group.blocks[b] for b in range(per_group))
    else:
      blocks = [group.blocks[b] for group in model.groups for b in range(per_group)]
    for kind, block in zip(self.kinds, blocks):
      if not callable(getattr(block.mixer, 'decode', None)):
        raise ValueError(f'model.pattern={cfg.pattern!r}: the {kind!r} mixer cannot decode with a '
                         'cache, so no infer.method can run it')
    # infer.fold_norms: per block, whether its mixer's / feed-forward's RMSNorm gain now lives in
    # the weights it feeds (run() then passes them the raw residual, layers.Folded)
    self.folded = [_fold_norms(b) if fold_norms else (False, False) for b in blocks]
    split = [nnx.split(b) for b in blocks]
    self.block_defs = [s[0] for s in split]
    self.is_attention = [isinstance(b.mixer, attention.Attention) for b in blocks]
    self.norm_def, norm_state = nnx.split(model.final_norm)
    self.exits = early_exit.parse_exit_layers(cfg)
    self.tied = cfg.tie_embeddings
    arrays = {'embedding': model.embedding[...], 'blocks': [s[1] for s in split],
              'final_norm': norm_state}
    if not self.tied:
      arrays['head'] = model.unembedding[...]
    if self.exits:
      self.exit_kind = cfg.exit_head
      if self.exit_kind in ('norm', 'own'):
        self.exit_norm_def = nnx.graphdef(model.exit_heads.norms[0])
        arrays['exit_norms'] = [nnx.state(n) for n in model.exit_heads.norms]
      if self.exit_kind == 'own':
        arrays['exit_heads'] = [p[...] for p in model.exit_heads.projections]
    self.vocab = cfg.vocab_size
    if 0 < vocab_limit < cfg.vocab_size:
      # Only ids below vocab_limit (the tokenizer's vocabulary; the model's is padded) can ever
      # be drawn, so the output projections keep just their rows: logits [..., vocab_limit],
      # the same softmax and draws as masking the rest, without reading the padding's weights
      # every step (a byte tokenizer on gpt_1b's 50,304-row head: 259 rows).
      self.vocab = vocab_limit
      if self.tied:
        arrays['head_rows'] = arrays['embedding'][:vocab_limit]
      else:
        arrays['head'] = arrays['head'][:, :vocab_limit]
      if 'exit_heads' in arrays:
        arrays['exit_heads'] = [w[:, :vocab_limit] for w in arrays['exit_heads']]
    self.arrays = jax.tree_util.tree_map_with_path(lambda path, x: _cast(path, x, dtype), arrays)

  # ---------------------------------------------------------------- pieces (inside jit)

  @property
  def num_layers(self) -> int:
    return len(self.kinds)

  def param_bytes(self, lo: int = 0, hi: int | None = None, head: bool = True) -> int:
    """Bytes of the weights layers lo..hi-1 (and the output head) read per step."""
    hi = self.num_layers if hi is None else hi
    size = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))
    total = sum(size(s) for s in self.arrays['blocks'][lo:hi])
    if head:
      total += size(self.arrays['head'] if not self.tied else self._tied_head(self.arrays))
    return total

  def embed(self, a, tokens_bn: jax.Array) -> jax.Array:
    return jnp.take(a['embedding'], tokens_bn, axis=0).astype(self.compute_dtype)

  def _project(self, x_bnd, w, transposed: bool):
    spec = 'bnd,vd->bnv' if transposed else 'bnd,dv->bnv'
    return jnp.einsum(spec, x_bnd.astype(self.compute_dtype), w.astype(self.compute_dtype),
                      preferred_element_type=jnp.float32).astype(self.output_dtype)

  @staticmethod
  def _tied_head(a):
    return a['head_rows'] if 'head_rows' in a else a['embedding']

  def head(self, a, x_bnd: jax.Array) -> jax.Array:
    """Final norm + output projection: logits [B, n, V] in the output dtype (V = self.vocab)."""
    x = nnx.merge(self.norm_def, a['final_norm'])(x_bnd)
    if self.tied:
      return self._project(x, self._tied_head(a), True)
    return self._project(x, a['head'], False)

  def exit_head(self, a, index: int, x_bnd: jax.Array) -> jax.Array:
    """Exit `index`'s logits [B, n, V] from the raw residual stream after its layer."""
    if self.exit_kind == 'shared':
      return self.head(a, x_bnd)
    x = nnx.merge(self.exit_norm_def, a['exit_norms'][index])(x_bnd)
    if self.exit_kind == 'own':
      return self._project(x, a['exit_heads'][index], False)
    return (self._project(x, self._tied_head(a), True) if self.tied
            else self._project(x, a['head'], False))

  def block(self, a, i: int):
    return nnx.merge(self.block_defs[i], a['blocks'][i])

  def init_cache(self, batch: int, max_len: int, ring_extra: int = 0) -> list:
    """Every layer's cache; sliding-window rings get ring_extra more slots than the window.

    A speculative pass writes keys for positions that may be rejected; in a ring of exactly w
    slots they would overwrite keys the re-drafted positions still see. With w + gamma + 1 slots
    an overwritten key is always older than any later query's window.
    """
    caches = []
    for i in range(self.num_layers):
      mixer = self.block({'blocks': self.arrays['blocks']}, i).mixer
      cache = mixer.init_cache(batch, max_len, self.compute_dtype)
      if self.is_attention[i] and mixer.kind == 'sliding_window' and ring_extra:
        cache = {k: jnp.zeros((v.shape[0], v.shape[1] + ring_extra) + v.shape[2:], v.dtype)
                 for k, v in cache.items()}
      caches.append(cache)
    return caches

  # ---------------------------------------------------------------- prefill

  def prefill(self, a, tokens_bt: jax.Array, start_b: jax.Array, caches: list,
              padded: bool) -> tuple[jax.Array, jax.Array, list]:
    """Left-padded prompts [B, T] through every layer: (logits [B, V] after the last prompt
    token, its final hidden state [B, D] before the norm, caches holding slots 0..T-1)."""
    t = tokens_bt.shape[1]
    slots = jnp.arange(t)[None]
    valid = slots >= start_b[:, None]
    positions = jnp.where(valid, slots - start_b[:, None], 0).astype(jnp.int32)
    ctx = layers.Context(positions=positions, segment_ids=valid.astype(jnp.int32) if padded
                         else None)
    x = self.embed(a, tokens_bt)
    out = []
    for i, cache in enumerate(caches):
      x, cache = self.block(a, i).prefill(x, ctx, cache)
      if padded:
        x = jnp.where(valid[..., None], x, jnp.zeros_like(x))
      out.append(cache)
    return self.head(a, x[:, -1:])[:, 0], x[:, -1], out

  # ---------------------------------------------------------------- n tokens through layers

  def run(self, a, lo: int, hi: int, x_bnd: jax.Array, slot: jax.Array, start_b: jax.Array,
          caches: list, snapshots: bool = False, keep_b: jax.Array | None = None):
    """Layers lo..hi-1 on n tokens at slots slot..slot+n-1.

    Returns (x, caches, snaps): snaps[i] holds recurrent layer i's caches after each of the n
    tokens (stacked on a leading axis) when `snapshots`, else None. keep_b [B] (bool): rows
    where it is True keep their input hidden state (an early-exited token: the deeper layers
    still write their caches from it, the CALM propagation) while the others advance.
    """
    caches = list(caches)
    snaps: dict[int, Any] = {}
    n = x_bnd.shape[1]
    positions = _positions(slot, n, start_b)
    for i in range(lo, hi):
      block = self.block(a, i)
      fold_mixer, fold_ff = self.folded[i]
      h = _folded(block.mixer_norm, x_bnd) if fold_mixer else block.mixer_norm(x_bnd)
      if self.is_attention[i]:
        y, caches[i] = attend(block.mixer, h, slot, start_b, caches[i], *self.attention)
      else:
        y, caches[i], snaps[i] = recurrent_steps(block.mixer, h, positions, caches[i], snapshots)
      ctx = layers.Context(positions=positions, segment_ids=None)
      if fold_ff:
        x_res = x_bnd + y
        new = x_res + block.ff(_folded(block.ff_norm, x_res), ctx)
      else:
        new = block._feed_forward(x_bnd + y, ctx)  # pylint: disable=protected-access
      x_bnd = new if keep_b is None else jnp.where(keep_b[:, None, None], x_bnd, new)
    return x_bnd, caches, (snaps if snapshots else None)

  def fill(self, a, lo: int, hi: int, x_b1d: jax.Array, slot: jax.Array, start_b: jax.Array,
           caches: list) -> list:
    """Layers lo..hi-1 only write their caches for one token from the hidden state x."""
    caches = list(caches)
    positions = _positions(slot, 1, start_b)
    for i in range(lo, hi):
      block = self.block(a, i)
      h = block.mixer_norm(x_b1d)
      if self.is_attention[i]:
        caches[i] = write_keys(block.mixer, h, slot, start_b, caches[i])
      else:  # the state must advance over this position; the output is dropped (and so its ops)
        caches[i] = block.mixer.decode(h, positions, caches[i])[1]
    return caches


def _folded(norm, x):
  return layers.Folded(x, norm.eps, norm.compute_dtype)


def _fold_norms(block) -> tuple[bool, bool]:
  """infer.fold_norms: the block's RMSNorm gains folded into the plain float weights they feed
  (attention's wq / wk / wv; a SwiGLU's w_gate / w_up), each row of their input axis times its
  gain, and the gains set to ones, so that every path through the modules (prefill, the early
  exits' cache fill) computes what it did and `Engine.run` may hand the projections the raw
  residual with its RMS factor (layers.Folded: no normalised copy written before them).
  Quantized, low-rank, LoRA or transposed weights are left alone. -> (mixer, feed-forward)
  folded."""

  def plain(module, names) -> bool:
    return all(isinstance(getattr(module, n, None), nnx.Param) for n in names)

  def fold(norm, module, names) -> bool:
    gain = norm.scale[...].astype(jnp.float32)
    for name in names:
      w = getattr(module, name)
      scaled = w[...].astype(jnp.float32) * gain.reshape((-1,) + (1,) * (w[...].ndim - 1))
      w[...] = scaled.astype(w[...].dtype)
    norm.scale[...] = jnp.ones_like(norm.scale[...])
    return True

  qkv, gate_up = ('wq', 'wk', 'wv'), ('w_gate', 'w_up')
  mixer = (isinstance(block.mixer, attention.Attention) and
           isinstance(block.mixer_norm, norms.RMSNorm) and plain(block.mixer, qkv))
  ff = (block.has_ff and isinstance(block.ff, mlp.SwiGLU) and
        isinstance(block.ff_norm, norms.RMSNorm) and plain(block.ff, gate_up))
  return (mixer and fold(block.mixer_norm, block.mixer, qkv),
          ff and fold(block.ff_norm, block.ff, gate_up))


def rollback(caches: list, snaps: dict[int, Any] | None, index: jax.Array) -> list:
  """Recurrent layers' caches as they were after token `index` of a pass (attention: as is)."""
  if not snaps:
    return caches
  caches = list(caches)
  for i, stacked in snaps.items():
    caches[i] = jax.tree.map(lambda s: jax.lax.dynamic_index_in_dim(s, index, 0, keepdims=False),
                             stacked)
  return caches


def recurrent_steps(mixer, h_bnd, positions_bn, cache, snapshots: bool):
  """A recurrent mixer over n tokens, one decode step each: (y, final cache, per-token caches)."""
  n = h_bnd.shape[1]
  if n == 1 and not snapshots:
    y, cache = mixer.decode(h_bnd, positions_bn, cache)
    return y, cache, None

  def step(c, inputs):
    h_b1d, pos_b1 = inputs
    y, c = mixer.decode(h_b1d[:, None], pos_b1[:, None], c)
    return c, (y[:, 0], c)

  cache, (ys, per_token) = jax.lax.scan(step, cache, (jnp.swapaxes(h_bnd, 0, 1),
                                                      jnp.swapaxes(positions_bn, 0, 1)))
  return jnp.swapaxes(ys, 0, 1), cache, (per_token if snapshots else None)


# ---------------------------------------------------------------- attention against the cache

def _positions(slot, n: int, start_b):
  """[B, n] rotary positions of n tokens at slots slot.. in rows whose prompts start at start_b."""
  return (slot + jnp.arange(n))[None] - start_b[:, None]


def _kv(mixer, h_bnd, slot, start_b):
  return mixer._qkv(h_bnd, _positions(slot, h_bnd.shape[1], start_b))  # pylint: disable=protected-access


def _write(cache, k, v, slot, ring: bool):
  length = cache['k'].shape[1]
  if ring:
    slots = (slot + jnp.arange(k.shape[1])) % length
    return {name: cache[name].at[:, slots].set(x.astype(cache[name].dtype))
            for name, x in (('k', k), ('v', v))}
  return {name: jax.lax.dynamic_update_slice_in_dim(cache[name], x.astype(cache[name].dtype),
                                                    slot, axis=1)
          for name, x in (('k', k), ('v', v))}


def write_keys(mixer, h_b1d, slot, start_b, cache):
  """Only the keys and values of one token (no query, no attention, no output projection)."""
  _, k, v = _kv(mixer, h_b1d, slot, start_b)
  return _write(cache, k, v, slot, mixer.kind == 'sliding_window')


def attend(mixer, h_bnd, slot, start_b, cache, kernel: str = 'xla', interpret: bool = False,
           write_in_kernel: bool = False, tiling: str = ''):
  """n new tokens at slots slot.. attend to the cache and causally to each other.

  kernel: effjax.kernels.decode_attention's backend ('auto', 'triton', 'xla') for the full-cache
  kinds without a block layout; where it resolves to 'xla', and for the sliding window's ring
  and the block-sparse layout, the masked attention below runs. write_in_kernel: where the
  kernel runs, it also writes the new keys and values into the cache (one kernel instead of the
  two cache writes and the attention). tiling: the kernel's (decode_attention.parse_tiling; ''
  for its default).
  """
  n = h_bnd.shape[1]
  length = cache['k'].shape[1]
  ring = mixer.kind == 'sliding_window'
  layout = mixer._layout(length)  # pylint: disable=protected-access
  in_kernel = not ring and layout is None and decode_kernel.resolve_backend(kernel) != 'xla'
  if in_kernel and write_in_kernel:
    # q and k leave the projections unrotated: the kernel rotates them (the tables are the
    # same for every layer of the step, so XLA computes them once)
    positions = _positions(slot, n, start_b)
    q, k, v = mixer._qkv(h_bnd, positions, rotate=False)  # pylint: disable=protected-access
    tables = rope.rope_tables(positions, mixer.head_dim, mixer.rope_theta)
    out, k_cache, v_cache = decode_kernel.decode_attention_write(
        q, k, v, cache['k'], cache['v'], start_b, slot, rotary=tables, backend=kernel,
        tiling=tiling or None, interpret=interpret)
    return mixer._output(out), {'k': k_cache, 'v': v_cache}  # pylint: disable=protected-access
  q, k, v = _kv(mixer, h_bnd, slot, start_b)
  q_slots = slot + jnp.arange(n)
  cache_slots = jnp.arange(length)
  if in_kernel:
    new_cache = _write(cache, k, v, slot, ring)
    out = decode_kernel.decode_attention(q, new_cache['k'], new_cache['v'], start_b, slot,
                                         backend=kernel, tiling=tiling or None,
                                         interpret=interpret)
    return mixer._output(out), new_cache  # pylint: disable=protected-access
  new_cache = _write(cache, k, v, slot, ring)

  def allowed(key_slots, q_limit):  # [B, n, L] mask for keys at absolute slots key_slots
    ok = (key_slots[None, None] >= start_b[:, None, None]) & (key_slots[None] <= q_limit)[None]
    if ring:
      ok &= (key_slots[None] > q_slots[:, None] - mixer.window)[None]
    if layout is not None:
      table = jnp.asarray(layout.array())
      ok &= table[q_slots // layout.block][:, jnp.clip(key_slots, 0) // layout.block][None]
    return ok

  if ring:  # the old ring (slots before `slot`) and the n new keys, as two parts of one softmax
    old_slots = (slot - 1) - jnp.mod(slot - 1 - cache_slots, length)
    parts = [(cache['k'], cache['v'], allowed(old_slots, jnp.full((n, 1), slot - 1))),
             (k, v, allowed(q_slots, q_slots[:, None]))]
  else:
    parts = [(new_cache['k'], new_cache['v'], allowed(cache_slots, q_slots[:, None]))]
  return mixer._output(attention_parts(q, parts)), new_cache  # pylint: disable=protected-access


def attention_parts(q_bnhd: jax.Array, parts) -> jax.Array:
  """Softmax attention of q over several (keys [B, L, K, D], values, mask [B, n, L]) parts.

  Scores accumulate in float32 from the cache's own dtype (no float32 copy of the cache); the
  probabilities are cast to the values' dtype for the second matmul.
  """
  b, n, heads, d = q_bnhd.shape
  kv_heads = parts[0][0].shape[2]
  q = q_bnhd.reshape(b, n, kv_heads, heads // kv_heads, d)
  scores = []
  for k, _, mask in parts:
    s = jnp.einsum('bnkgd,blkd->bkgnl', q.astype(k.dtype), k,
                   preferred_element_type=jnp.float32) * d ** -0.5
    scores.append(jnp.where(mask[:, None, None], s, -jnp.inf))
  top = jnp.max(jnp.stack([jnp.max(s, axis=-1) for s in scores]), axis=0)[..., None]
  out, total = 0.0, 0.0
  for s, (_, v, _) in zip(scores, parts):
    p = jnp.exp(s - top)
    total = total + jnp.sum(p, axis=-1, keepdims=True)
    out = out + jnp.einsum('bkgnl,blkd->bkgnd', p.astype(v.dtype), v,
                           preferred_element_type=jnp.float32)
  out = out / total
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, n, heads, d).astype(q_bnhd.dtype)
