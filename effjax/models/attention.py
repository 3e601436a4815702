"""Softmax attention with grouped-query heads and rotary positions, in four kinds.

One class serves every kind; the kind fixes the mask each query sees:
  'attention' / 'dense'  full causal, through `jax.nn.dot_product_attention` (XLA everywhere,
                         cuDNN's fused kernel on GPU when the compute dtype allows it);
  'flash'                full causal, through the block-sparse flash op
                         (effjax.kernels.flash_attention);
  'sliding_window'       the op with window=model.attention_window (each query sees at most w keys
                         ending at itself);
  'block_sparse'         the op with a BigBird layout (local band, global and random blocks) from
                         the model.block_sparse_* fields.
Packed sequences are kept apart with segment ids (a token attends only to earlier tokens of its
own document; id 0 is padding) in every kind.

A Pallas kernel can't be partitioned by XLA, so under a device mesh the op runs inside
`jax.shard_map` with batch and heads split as the logical sharding rules say (the sequence must
stay whole); the 'reference' backend is plain jnp and is partitioned like any other op.

Decoding with a key/value cache: `init_cache` allocates it, `prefill` runs the full forward on a
prompt and fills it, `decode` attends one new token to the cached keys (the full-cache kinds
through effjax.kernels.decode_attention, a Triton kernel on GPU). The dense, flash and
block-sparse kinds keep [B, max_len, Hkv, D]; the sliding window keeps a ring buffer of its w
most recent keys (slot = position % w), so its memory is O(w) however long the generation.
Keys are stored after the rotary embedding, so each is rotated once, at its own position.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from effjax.kernels import decode_attention as decode_kernel
from effjax.kernels import flash_attention as fa
from effjax.models import layers
from effjax.models.registry import MIXERS, parse_pattern
from effjax.models.rope import apply_rope, rope_tables
from effjax.parallel.sharding import constrain, current_rules, logical_to_spec

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn')
BACKENDS = fa.KERNEL_BACKENDS  # model.attention_backend, for the flash-op kinds
OP_KINDS = ('flash', 'sliding_window', 'block_sparse')  # the kinds that run the flash op
Cache = dict[str, jax.Array]  # {'k': [B, L, Hkv, D], 'v': [B, L, Hkv, D]} in the compute dtype

# cuDNN's fused attention defines only a reverse-mode derivative (a custom VJP around an opaque
# kernel), so forward-mode and second-order derivatives can't pass through it. Code that needs them
# (Sophia-H's Hessian-vector products) traces the model inside `forward_differentiable()`, which
# swaps cuDNN for XLA's attention at trace time; the parameters and the math are the same. The
# flash op is a custom VJP too: there its plain-jnp reference (same masks) stands in.
_FORWARD_DIFFERENTIABLE = contextvars.ContextVar('forward_differentiable', default=False)


@contextlib.contextmanager
def forward_differentiable():
  """Within this context (at trace time), attention avoids kernels that only define a VJP."""
  token = _FORWARD_DIFFERENTIABLE.set(True)
  try:
    yield
  finally:
    _FORWARD_DIFFERENTIABLE.reset(token)


def forward_differentiable_active() -> bool:
  """Whether the code being traced must stay forward-mode differentiable (any mixer's kernel)."""
  return _FORWARD_DIFFERENTIABLE.get()


def resolve_implementation(requested: str, compute_dtype) -> str:
  """'auto' -> cuDNN on GPU for half-precision compute (its fused kernel needs it), else XLA."""
  if requested != 'auto':
    return requested
  half = jnp.dtype(compute_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return 'cudnn' if jax.default_backend() == 'gpu' and half else 'xla'


def segment_mask(segment_ids_bt: jax.Array) -> jax.Array:
  """[batch, 1, q, k] True where query and key belong to the same (non-padding) segment."""
  same = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
  return (same & (segment_ids_bt[:, None, :] > 0))[:, None]


# ------------------------------------------------------------------ the op's static choices

def op_blocks(backend: str, head_dim: int, seq_len: int,
              layout_block: int | None = None) -> tuple[int, int, int]:
  """(padded length, block_q, block_k) the flash kinds run the op with for a sequence length.

  The backend's default tiles, shrunk (never below 16, and never for Mosaic or Mosaic GPU,
  whose tiles follow the TPU's layout or Hopper's warpgroups) for short sequences and to divide
  the layout block; the sequence is padded at the end to a multiple of every block. Padding keys
  come after every real query, so causality alone hides them. Training lengths that the tiles
  divide are never padded.
  """
  backend = fa.resolve_backend(backend)
  blocks = list(fa.default_blocks(backend, head_dim))
  if backend not in ('mosaic', 'mosaic_gpu'):
    fit = max(16, 1 << max(seq_len - 1, 0).bit_length())  # seq_len rounded up to a power of two
    blocks = [min(b, fit) for b in blocks]
  if layout_block:
    blocks = [math.gcd(b, layout_block) for b in blocks]
  if backend == 'mosaic_gpu':
    # The query tile is fixed; a key tile longer than it (head dim 64 takes 256) is halved,
    # down to 64, until it divides the length padded for the query tile, so it adds no padding.
    padded = -(-seq_len // math.lcm(blocks[0], layout_block or 1)) * math.lcm(
        blocks[0], layout_block or 1)
    while blocks[1] > 64 and padded % blocks[1]:
      blocks[1] //= 2
  multiple = math.lcm(*blocks, layout_block or 1)
  return -(-seq_len // multiple) * multiple, blocks[0], blocks[1]


def op_backend(cfg, kind: str) -> str:
  """The flash op's backend for a layer of `kind`: model.attention_backend with 'auto' resolved
  for this device, the compute dtype and the kind's layout block (fa.resolve_backend), so the
  tiles (op_blocks) and the op agree on it."""
  block = cfg.block_sparse_block if kind == 'block_sparse' else None
  return fa.resolve_backend(cfg.attention_backend, dtype=jnp.dtype(cfg.compute_dtype),
                            layout_block=block)


def op_backends(cfg) -> dict[str, str]:
  """{kind: backend} for the flash-op kinds in cfg.pattern (what the log reports at start)."""
  kinds = {mixer for mixer, _ in parse_pattern(cfg.pattern)}
  return {kind: op_backend(cfg, kind) for kind in OP_KINDS if kind in kinds}


@functools.lru_cache(maxsize=64)
def _bigbird(seq_len: int, block: int, local: int, global_: int, random: int, seed: int):
  return fa.bigbird_layout(seq_len, block, local_blocks=local, global_blocks=global_,
                           random_blocks=random, seed=seed, causal=True)


def shard_heads(op, q_bshd: jax.Array, k_bshd: jax.Array, v_bshd: jax.Array,
                segment_ids_bs: jax.Array | None) -> jax.Array:
  """op(q, k, v, segment_ids) run per device under the current mesh, batch and heads split.

  The split follows the logical rules of 'act_batch' and 'act_heads'/'act_kv_heads'; a mesh axis
  that does not divide its dimension (a one-sequence generation batch) is left out, so that
  dimension is replicated instead. Outside a mesh, op is called directly.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or not current_rules():
    return op(q_bshd, k_bshd, v_bshd, segment_ids_bs)

  def fitted(spec: P, shape: tuple[int, ...]) -> list:
    out = []
    for dim, axes in zip(shape, spec):
      axes_t = tuple(a for a in ((axes,) if isinstance(axes, str) else tuple(axes or ()))
                     if mesh.shape[a] > 1)
      keep = axes_t and dim % math.prod(mesh.shape[a] for a in axes_t) == 0
      out.append((axes_t[0] if len(axes_t) == 1 else axes_t) if keep else None)
    return out

  q_spec = fitted(logical_to_spec(('act_batch', 'act_length', 'act_heads', None)), q_bshd.shape)
  kv_spec = fitted(logical_to_spec(('act_batch', 'act_length', 'act_kv_heads', None)),
                   k_bshd.shape)
  if q_spec[1] is not None or kv_spec[1] is not None:
    raise ValueError(f'sharding_rules.act_length maps the sequence to mesh axes {q_spec[1]}: the '
                     'flash attention kernels need whole sequences per device; map act_length to '
                     "None or use model.attention_backend='reference'")
  if kv_spec[2] != q_spec[2]:
    # Query head h reads kv head h // group; that survives the split only when both head axes are
    # cut into the same contiguous pieces. Otherwise give every query head its own kv copy.
    group = q_bshd.shape[2] // k_bshd.shape[2]
    k_bshd, v_bshd = (jnp.repeat(t, group, axis=2) for t in (k_bshd, v_bshd))
  kv_spec = P(kv_spec[0], None, q_spec[2], None) if kv_spec[2] != q_spec[2] else P(*kv_spec)
  q_spec = P(*q_spec)
  seg_spec = P(q_spec[0], None)
  if segment_ids_bs is None:
    fn = lambda q, k, v: op(q, k, v, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                         check_vma=False)(q_bshd, k_bshd, v_bshd)
  return jax.shard_map(op, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
                       out_specs=q_spec, check_vma=False)(q_bshd, k_bshd, v_bshd, segment_ids_bs)


# ------------------------------------------------------------------ the mixer

@MIXERS.register('dense')  # an alias, registered after 'attention' (decorators run bottom-up)
@MIXERS.register('attention')
class Attention(nnx.Module):
  """Causal grouped-query self-attention: num_kv_heads key/value heads shared by query groups.

  `kind` selects the mask and the path ('dense': jax.nn.dot_product_attention; the OP_KINDS: the
  flash op); the registered subclasses below only fix it.
  """
  kind = 'dense'
  # decode(): on the decode-attention kernel's path, whether the kernel writes the new key and
  # value into the cache itself (set for decoding by set_cache_write_in_kernel,
  # infer.cache_write_in_kernel) or two dynamic_update_slice writes come first.
  cache_write_in_kernel = False

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    prec = layers.Precision.from_config(cfg)
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, layers.head_dim(cfg)
    std = cfg.init_std
    out_std = std / math.sqrt(2 * cfg.num_layers)  # residual branches summed over depth
    self.wq = layers.normal_param(rngs, (d, n, h), ('embed', 'heads', 'head_dim'), std, prec.param)
    self.wk = layers.normal_param(rngs, (d, k, h), ('embed', 'kv_heads', 'head_dim'), std, prec.param)
    self.wv = layers.normal_param(rngs, (d, k, h), ('embed', 'kv_heads', 'head_dim'), std, prec.param)
    self.wo = layers.normal_param(rngs, (n, h, d), ('heads', 'head_dim', 'embed'), out_std,
                                  prec.param)
    self.rope_theta = cfg.rope_theta
    self.compute_dtype = prec.compute
    self.implementation = resolve_implementation(cfg.attention_impl, prec.compute)
    self.num_kv_heads, self.head_dim = k, h
    self.backend = op_backend(cfg, self.kind)
    self.interpret = cfg.attention_interpret
    self.window = cfg.attention_window if self.kind == 'sliding_window' else None
    # (block, local, global, random, seed) of the BigBird layout; the layout itself depends on the
    # sequence length, so it is built (and cached) per traced length.
    self.sparsity = ((cfg.block_sparse_block, cfg.block_sparse_local_blocks,
                      cfg.block_sparse_global_blocks, cfg.block_sparse_random_blocks,
                      cfg.block_sparse_seed) if self.kind == 'block_sparse' else None)

  # ---------------------------------------------------------------- forward

  def __call__(self, x_btd: jax.Array, ctx: layers.Context) -> jax.Array:
    q, k, v = self._qkv(x_btd, ctx.positions)
    return self._output(self._attend(q, k, v, ctx.segment_ids))

  def _qkv(self, x_btd: jax.Array, positions_bt: jax.Array, rotate: bool = True):
    """q, k, v of x; q and k rotated to their positions unless `rotate` is False (the decoding
    engine's kernel then rotates them itself)."""
    cdt = self.compute_dtype
    q, k, v = layers.matmuls(x_btd, [('btd,dnh->btnh', self.wq), ('btd,dkh->btkh', self.wk),
                                     ('btd,dkh->btkh', self.wv)], cdt)
    if rotate:
      q = apply_rope(q, positions_bt, self.rope_theta)
      k = apply_rope(k, positions_bt, self.rope_theta)
    q = constrain(q, ('act_batch', 'act_length', 'act_heads', None))
    k = constrain(k, ('act_batch', 'act_length', 'act_kv_heads', None))
    v = constrain(v, ('act_batch', 'act_length', 'act_kv_heads', None))
    return q, k, v

  def _output(self, out_btnh: jax.Array) -> jax.Array:
    out_btnh = checkpoint_name(out_btnh, 'attention_out')
    y = layers.matmul('btnh,nhd->btd', out_btnh, self.wo, self.compute_dtype)
    return constrain(y, ('act_batch', 'act_length', 'act_embed'))

  def _attend(self, q, k, v, segment_ids, layout_len: int | None = None) -> jax.Array:
    if self.kind == 'dense':
      mask = None if segment_ids is None else segment_mask(segment_ids)
      impl = 'xla' if _FORWARD_DIFFERENTIABLE.get() else self.implementation
      return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=impl)
    return self._attend_op(q, k, v, segment_ids, layout_len)

  def _layout(self, seq_len: int) -> fa.BlockLayout | None:
    """The block layout over seq_len tokens (rounded up to whole blocks); None unless sparse."""
    if self.sparsity is None:
      return None
    block = self.sparsity[0]
    return _bigbird(-(-seq_len // block) * block, *self.sparsity)

  def _attend_op(self, q, k, v, segment_ids, layout_len: int | None) -> jax.Array:
    """The flash op on q [B, S, Hq, D], padded at the end to whole tiles and cut back."""
    s = q.shape[1]
    block = self.sparsity[0] if self.sparsity else None
    padded, block_q, block_k = op_blocks(self.backend, self.head_dim, s, block)
    layout = self._layout(padded)
    if layout is not None and layout_len is not None:
      # Prefill: the rows of the cache-length layout that decoding will use, so both agree.
      full = self._layout(max(layout_len, padded)).array()
      layout = fa.BlockLayout.from_array(block, full[:layout.num_blocks, :layout.num_blocks])
    if padded != s:
      pad = [(0, 0), (0, padded - s), (0, 0), (0, 0)]
      q, k, v = (jnp.pad(t, pad) for t in (q, k, v))
      if segment_ids is not None:
        segment_ids = jnp.pad(segment_ids, [(0, 0), (0, padded - s)])
    static = dict(causal=True, window=self.window, layout=layout)
    if _FORWARD_DIFFERENTIABLE.get():
      out = fa.attention_reference(q, k, v, segment_ids=segment_ids, **static)
    else:
      op = lambda q, k, v, seg: fa.flash_attention(
          q, k, v, segment_ids=seg, block_q=block_q, block_k=block_k, backend=self.backend,
          interpret=self.interpret, **static)
      if self.backend == 'reference':
        out = op(q, k, v, segment_ids)
      else:
        out = shard_heads(op, q, k, v, segment_ids)
    return out[:, :s]

  # ---------------------------------------------------------------- decoding

  def cache_length(self, max_len: int) -> int:
    """Cached positions: w for the sliding window's ring buffer, else every position."""
    return self.window if self.kind == 'sliding_window' else max_len

  def init_cache(self, batch: int, max_len: int, dtype=None) -> Cache:
    shape = (batch, self.cache_length(max_len), self.num_kv_heads, self.head_dim)
    dtype = self.compute_dtype if dtype is None else dtype
    return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}

  def prefill(self, x_btd: jax.Array, ctx: layers.Context,
              cache: Cache) -> tuple[jax.Array, Cache]:
    """The full forward on a prompt at positions 0..T-1, its keys and values written to cache."""
    t, length = x_btd.shape[1], cache['k'].shape[1]
    q, k, v = self._qkv(x_btd, ctx.positions)
    y = self._output(self._attend(q, k, v, ctx.segment_ids, layout_len=length))
    if self.kind == 'sliding_window':
      keep = min(t, length)  # only the last w keys can be seen again
      slots = jnp.arange(t - keep, t) % length
      new = {name: cache[name].at[:, slots].set(kv[:, t - keep:].astype(cache[name].dtype))
             for name, kv in (('k', k), ('v', v))}
    else:
      if t > length:
        raise ValueError(f'prompt of {t} tokens does not fit a cache of max_len={length}; '
                         'allocate a longer cache')
      new = {name: jax.lax.dynamic_update_slice_in_dim(cache[name], kv.astype(cache[name].dtype),
                                                       0, axis=1)
             for name, kv in (('k', k), ('v', v))}
    return y, new

  def decode(self, x_b1d: jax.Array, position: jax.Array,
             cache: Cache) -> tuple[jax.Array, Cache]:
    """One token at `position` (a scalar shared by the batch) attends to the cached keys <= it."""
    b = x_b1d.shape[0]
    position = jnp.asarray(position, jnp.int32)
    positions = jnp.full((b, 1), position)
    length = cache['k'].shape[1]
    ring = self.kind == 'sliding_window'
    slot = position % length if ring else position
    kernel = (not ring and self.sparsity is None and self.backend != 'reference' and
              decode_kernel.resolve_backend('auto') == 'triton')
    start = jnp.zeros((b,), jnp.int32)
    if kernel and self.cache_write_in_kernel:  # the kernel rotates q and k and writes the cache
      q, k, v = self._qkv(x_b1d, positions, rotate=False)
      out, k_cache, v_cache = decode_kernel.decode_attention_write(
          q, k, v, cache['k'], cache['v'], start, position,
          rotary=rope_tables(positions, self.head_dim, self.rope_theta), backend='triton',
          interpret=self.interpret)
      return self._output(out), {'k': k_cache, 'v': v_cache}
    q, k, v = self._qkv(x_b1d, positions)
    cache = {name: jax.lax.dynamic_update_slice_in_dim(cache[name], kv.astype(cache[name].dtype),
                                                       slot, axis=1)
             for name, kv in (('k', k), ('v', v))}
    if kernel:
      # The decode-attention kernel on GPU outside a partitioned mesh (its precision: scores
      # accumulated in float32 from the cache's dtype, probabilities in that dtype for the value
      # product, as the decoding engine does); elsewhere, and with
      # model.attention_backend='reference', the float32 masked softmax below.
      out = decode_kernel.decode_attention(q, cache['k'], cache['v'], start, position,
                                           backend='triton', interpret=self.interpret)
      return self._output(out), cache
    slots = jnp.arange(length)
    # The position each slot holds: itself, or in the ring the latest p <= position with p = slot
    # (mod w); never-written slots come out negative (ring) or above position (full cache).
    key_pos = position - (position - slots) % length if ring else slots
    allowed = (key_pos >= 0) & (key_pos <= position)
    layout = self._layout(length)  # the block-sparse cache holds every position
    if layout is not None:
      table = jnp.asarray(layout.array())
      allowed &= table[position // layout.block][jnp.clip(key_pos, 0) // layout.block]
    out = decode_attention(q, cache['k'], cache['v'], allowed)
    return self._output(out), cache

  # ---------------------------------------------------------------- accounting

  @classmethod
  def flops_per_token(cls, cfg, seq_len: int) -> float:
    """Forward FLOPs per token: projections 2*params, plus scores and values.

    Dense: 2*2*T*n*h at half (causal). The flash kinds: the tiles the kernel computes at its
    default block sizes (attention_flops) over T tokens, so a window of w costs O(w) per token
    and a sparse layout only its visited blocks.
    """
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, layers.head_dim(cfg)
    projections = 2 * d * h * (2 * n + 2 * k)
    if cls.kind == 'dense':
      return projections + 0.5 * 4 * seq_len * n * h
    block = cfg.block_sparse_block if cls.kind == 'block_sparse' else None
    padded, block_q, block_k = op_blocks(op_backend(cfg, cls.kind), h, seq_len, block)
    window = cfg.attention_window if cls.kind == 'sliding_window' else None
    layout = None
    if block is not None:
      layout = _bigbird(padded, block, cfg.block_sparse_local_blocks,
                        cfg.block_sparse_global_blocks, cfg.block_sparse_random_blocks,
                        cfg.block_sparse_seed)
    tiles = fa.attention_flops(1, padded, n, h, block_q=block_q, block_k=block_k, causal=True,
                               window=window, layout=layout)
    return projections + tiles / seq_len

  @staticmethod
  def num_params(cfg) -> int:
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, layers.head_dim(cfg)
    return d * h * (2 * n + 2 * k)


@MIXERS.register('flash')
class FlashAttention(Attention):
  """Full causal attention through the flash op."""
  kind = 'flash'


@MIXERS.register('sliding_window')
class SlidingWindowAttention(Attention):
  """Each query sees the model.attention_window most recent keys, itself included."""
  kind = 'sliding_window'


@MIXERS.register('block_sparse')
class BlockSparseAttention(Attention):
  """A BigBird block layout: local band, global and random key blocks."""
  kind = 'block_sparse'


def set_cache_write_in_kernel(model: nnx.Module, on: bool) -> nnx.Module:
  """Every attention mixer of `model` decodes with (on) or without the decode-attention kernel
  writing the cache itself (Attention.cache_write_in_kernel), in place; returned."""
  for _, module in nnx.iter_modules(model):
    if isinstance(module, Attention):
      module.cache_write_in_kernel = bool(on)
  return model


def decode_attention(q_b1nh: jax.Array, k_blkh: jax.Array, v_blkh: jax.Array,
                     allowed_l: jax.Array) -> jax.Array:
  """One query per row against L cached keys; float32 softmax over the allowed slots."""
  b, _, n, h = q_b1nh.shape
  kv = k_blkh.shape[2]
  q_bkgh = q_b1nh.reshape(b, kv, n // kv, h).astype(jnp.float32)  # head i reads kv i // group
  s_bkgl = jnp.einsum('bkgh,blkh->bkgl', q_bkgh, k_blkh.astype(jnp.float32)) * h ** -0.5
  s_bkgl = jnp.where(allowed_l, s_bkgl, -jnp.inf)  # the token itself is always allowed
  p_bkgl = jax.nn.softmax(s_bkgl, axis=-1)
  out = jnp.einsum('bkgl,blkh->bkgh', p_bkgl, v_blkh.astype(jnp.float32))
  return out.reshape(b, 1, n, h).astype(q_b1nh.dtype)

