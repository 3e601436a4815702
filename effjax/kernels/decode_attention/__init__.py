"""Attention of a few new tokens against a key/value cache: the decoding step's attention.

`decode_attention(q [B, n, Hq, D], k, v [B, L, Hkv, D], start [B], slot)` -> [B, n, Hq, D]; query
i of sequence b sees the cache slots start_b .. slot + i (reference.py states it exactly). The
decoding engine (effjax/infer/engine.py) calls it for the full-cache attention kinds after writing
the new keys.

Why a kernel: through XLA a batch-1 step's attention over the cache became about ten small
fusions (scores, mask, max, exponent, sum, the value product, converts) of 1-8 us each on an
H200, about a third of a 1B model's layer time (experiments/early_exit). The Triton kernel
(gpu.py) reads the cache once, only up to the last written slot, split over the cache so that
every SM takes part, and a small merge combines the ranges (with one range, as at batch 16, the
kernel normalises its output itself and no merge runs).

`decode_attention_write(q, k_new, v_new, k, v, start, slot)` does the cache write too: the
kernel attends to the cache below `slot` and to the new tokens from its inputs, and stores their
keys and values into the cache buffers in place (infer.cache_write_in_kernel), which saves the
step two dynamic_update_slice kernels a layer.

Backends:
  'triton'  the Pallas kernel (GPU; interpret=True runs it on CPU for tests);
  'xla'     the reference (plain JAX, any device, partitioned like any op under a mesh);
  'auto'    'triton' on GPU when the shapes fit the kernel (`kernel_unsupported`) and no
            multi-device mesh with automatically partitioned axes is active; 'xla' otherwise.

Tiling (block_k, split): cache slots per loop step, and ranges the cache is cut into (one
program each per sequence and key/value head). `default_tiling` aims for TARGET_PROGRAMS
programs with at least MIN_BLOCKS_PER_SPLIT blocks each, at 4 warps and 2 pipeline stages;
`tiling=` (and infer.decode_attention_tiling, through the decoding engine) sets any of the four
(`parse_tiling`, `resolve_tiling`). Forward only: decoding does not differentiate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effjax.kernels._compat import partitioned_mesh
from effjax.models import rope
from effjax.kernels.decode_attention.reference import allowed_slots, decode_attention_reference

__all__ = ['BACKENDS', 'allowed_slots', 'decode_attention', 'decode_attention_reference',
           'decode_attention_write', 'default_tiling', 'kernel_unsupported', 'parse_tiling',
           'resolve_backend', 'resolve_tiling', 'write_cache']

BACKENDS = ('auto', 'triton', 'xla')
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
DEFAULT_BLOCK_K = 64
TARGET_PROGRAMS = 264  # two per SM of an H100 / H200 (132 SMs)
MIN_BLOCKS_PER_SPLIT = 2


def kernel_unsupported(n: int, heads: int, kv_heads: int, head_dim: int, dtype) -> str | None:
  """Why the kernel cannot run these shapes, or None when it can."""
  from effjax.kernels.decode_attention import gpu
  if jnp.dtype(dtype) not in DTYPES:
    return f'dtype {jnp.dtype(dtype).name} (the kernel takes bfloat16, float16, float32)'
  if head_dim < gpu.MIN_TILE or head_dim & (head_dim - 1):
    return f'head dim {head_dim} is not a power of two >= {gpu.MIN_TILE}'
  rows = n * (heads // kv_heads)
  if gpu.padded_rows(rows) > gpu.MAX_ROWS:
    return f'{rows} query rows per key/value head (tokens x group) exceed {gpu.MAX_ROWS}'
  return None


def default_tiling(batch: int, kv_heads: int, length: int,
                   block_k: int | None = None) -> tuple[int, int]:
  """(block_k, split): DEFAULT_BLOCK_K (halved while it exceeds the cache), then the most
  ranges that keep batch x kv_heads x split within TARGET_PROGRAMS and every range at least
  MIN_BLOCKS_PER_SPLIT blocks long."""
  from effjax.kernels.decode_attention import gpu
  if block_k is None:
    block_k = DEFAULT_BLOCK_K
    while block_k > gpu.MIN_TILE and block_k >= 2 * length:
      block_k //= 2
  blocks = -(-length // block_k)
  split = max(1, min(TARGET_PROGRAMS // max(batch * kv_heads, 1),
                     blocks // MIN_BLOCKS_PER_SPLIT))
  return block_k, split


def parse_tiling(spec: str) -> tuple[int | None, int | None, int, int] | None:
  """infer.decode_attention_tiling: '' -> None (default_tiling, 4 warps, 2 stages), or
  'BLOCK_K:SPLIT[:WARPS[:STAGES]]' -> (block_k, split, num_warps, num_stages), where BLOCK_K or
  SPLIT may be 'auto' (None: default_tiling's choice). BLOCK_K a power of two >= 16, SPLIT a
  positive count of ranges (resolve_tiling caps it at the cache's blocks), WARPS 1, 2, 4, 8 or
  16, STAGES 1-8. Anything else is one ValueError naming the part and what is allowed."""
  from effjax.kernels.decode_attention import gpu
  if not spec:
    return None
  parts = spec.split(':')
  if not 2 <= len(parts) <= 4:
    raise ValueError(f'decode attention tiling {spec!r}: expected BLOCK_K:SPLIT[:WARPS[:STAGES]] '
                     f"(BLOCK_K, SPLIT may be 'auto'), e.g. 64:8 or 128:auto:4:3")
  def number(text, what):
    if what in ('BLOCK_K', 'SPLIT') and text == 'auto':
      return None
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
      raise ValueError(f'decode attention tiling {spec!r}: {what} must be a positive integer'
                       + (" or 'auto'" if what in ('BLOCK_K', 'SPLIT') else '') + f', got {text!r}')
    return int(text)
  block_k, split = number(parts[0], 'BLOCK_K'), number(parts[1], 'SPLIT')
  warps = number(parts[2], 'WARPS') if len(parts) > 2 else 4
  stages = number(parts[3], 'STAGES') if len(parts) > 3 else 2
  if block_k is not None and (block_k < gpu.MIN_TILE or block_k & (block_k - 1)):
    raise ValueError(f'decode attention tiling {spec!r}: BLOCK_K must be a power of two >= '
                     f'{gpu.MIN_TILE}, got {block_k}')
  if warps not in (1, 2, 4, 8, 16):
    raise ValueError(f'decode attention tiling {spec!r}: WARPS must be 1, 2, 4, 8 or 16, got '
                     f'{warps}')
  if stages > 8:
    raise ValueError(f'decode attention tiling {spec!r}: STAGES must be 1-8, got {stages}')
  return block_k, split, warps, stages


def resolve_tiling(tiling, batch: int, kv_heads: int, length: int) -> tuple[int, int, int, int]:
  """(block_k, split, num_warps, num_stages) for a cache of `length` slots from `tiling`: None
  (default_tiling, 4 warps, 2 stages), a (block_k, split) or (block_k, split, warps, stages)
  tuple used as given, or a parse_tiling spec string (its 'auto' parts from default_tiling, its
  split capped at the cache's blocks, so one spec serves every context length)."""
  if tiling is None or isinstance(tiling, str):
    parsed = parse_tiling(tiling) if tiling else None
    if parsed is None:
      return (*default_tiling(batch, kv_heads, length), 4, 2)
    block_k, split, warps, stages = parsed
    block_k, auto_split = default_tiling(batch, kv_heads, length, block_k)
    blocks = -(-length // block_k)
    return block_k, auto_split if split is None else min(split, blocks), warps, stages
  tiling = tuple(tiling)
  if not 2 <= len(tiling) <= 4:
    raise ValueError(f'decode attention tiling {tiling}: expected (block_k, split[, num_warps'
                     f'[, num_stages]])')
  return tiling + (4, 2)[len(tiling) - 2:]


def resolve_backend(backend: str) -> str:
  if backend not in BACKENDS:
    raise ValueError(f'decode attention backend must be one of {BACKENDS}, got {backend!r}')
  if backend != 'auto':
    return backend
  return 'triton' if jax.default_backend() == 'gpu' and not partitioned_mesh() else 'xla'


def _backend_for(backend: str, n: int, heads: int, kv_heads: int, d: int, dtype) -> str:
  """'triton' or 'xla' for these shapes ('auto' falls back to 'xla' where the kernel cannot run;
  'triton' there is one ValueError naming why)."""
  resolved = resolve_backend(backend)
  reason = kernel_unsupported(n, heads, kv_heads, d, dtype)
  if resolved == 'triton' and reason:
    if backend == 'auto':
      return 'xla'
    raise ValueError(f"decode attention backend='triton' cannot run these shapes: {reason}; "
                     "use 'xla' or 'auto'")
  return resolved


def _check_shapes(q_bnhd, k_blkd, v_blkd) -> None:
  if q_bnhd.ndim != 4 or k_blkd.ndim != 4 or v_blkd.shape != k_blkd.shape:
    raise ValueError(f'decode attention takes q [B, n, Hq, D] and k, v [B, L, Hkv, D] of one '
                     f'shape; got q {q_bnhd.shape}, k {k_blkd.shape}, v {v_blkd.shape}')
  b, _, heads, d = q_bnhd.shape
  _, _, kv_heads, dk = k_blkd.shape
  if k_blkd.shape[0] != b or dk != d or heads % kv_heads:
    raise ValueError(f'decode attention: q {q_bnhd.shape} and cache {k_blkd.shape} disagree '
                     '(batch and head dim must match, query heads must be a multiple of the '
                     'key/value heads)')


def _grouped_rows(q_bnhd, kv_heads: int):
  """q [B, n, Hq, D] -> [B, Hkv, n x group, D], row = token x group + g (for one new token a
  reshape alone: the kernel pads the rows itself)."""
  b, n, heads, d = q_bnhd.shape
  group = heads // kv_heads
  q = q_bnhd.reshape(b, n, kv_heads, group, d).transpose(0, 2, 1, 3, 4)
  return q.reshape(b, kv_heads, n * group, d)


def _ungrouped(out, q_bnhd, kv_heads: int):
  """The merged [B, Hkv, rows, D] -> [B, n, Hq, D] in q's dtype."""
  b, n, heads, d = q_bnhd.shape
  out = out.reshape(b, kv_heads, n, heads // kv_heads, d).transpose(0, 2, 1, 3, 4)
  return out.reshape(b, n, heads, d).astype(q_bnhd.dtype)


def decode_attention(q_bnhd: jax.Array, k_blkd: jax.Array, v_blkd: jax.Array,
                     start_b: jax.Array, slot, *, backend: str = 'auto',
                     tiling: tuple[int, ...] | str | None = None,
                     interpret: bool = False) -> jax.Array:
  """Query i of row b attends to cache slots start_b .. slot + i; -> [B, n, Hq, D] in q's dtype.
  tiling: see resolve_tiling (None: default_tiling)."""
  _check_shapes(q_bnhd, k_blkd, v_blkd)
  b, n, heads, d = q_bnhd.shape
  _, length, kv_heads, _ = k_blkd.shape
  start_b = jnp.asarray(start_b, jnp.int32).reshape(b)
  slot = jnp.asarray(slot, jnp.int32)
  if _backend_for(backend, n, heads, kv_heads, d, k_blkd.dtype) == 'xla':
    return decode_attention_reference(q_bnhd, k_blkd, v_blkd, start_b, slot)

  from effjax.kernels.decode_attention import gpu
  group = heads // kv_heads
  block_k, split, warps, stages = resolve_tiling(tiling, b, kv_heads, length)
  q = _grouped_rows(q_bnhd, kv_heads)
  out, m, l = gpu.partials(q, k_blkd, v_blkd, start_b, slot.reshape(1), n=n, group=group,
                           block_k=block_k, split=split, num_warps=warps, num_stages=stages,
                           interpret=interpret)
  return _ungrouped(out if m is None else gpu.merge(out, m, l, n * group), q_bnhd, kv_heads)


def write_cache(k_blkd: jax.Array, v_blkd: jax.Array, k_new: jax.Array, v_new: jax.Array,
                slot) -> tuple[jax.Array, jax.Array]:
  """The n new tokens' keys and values [B, n, Hkv, D] written at slots slot .. slot + n - 1."""
  return tuple(jax.lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype), slot, axis=1)
               for cache, new in ((k_blkd, k_new), (v_blkd, v_new)))


def decode_attention_write(q_bnhd: jax.Array, k_new: jax.Array, v_new: jax.Array,
                           k_blkd: jax.Array, v_blkd: jax.Array, start_b: jax.Array, slot, *,
                           rotary: tuple[jax.Array, jax.Array] | None = None,
                           backend: str = 'auto', tiling: tuple[int, ...] | str | None = None,
                           interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`write_cache` then `decode_attention`, as one kernel on the 'triton' backend.

  k_new, v_new [B, n, Hkv, D]: the new tokens' keys and values, for slots slot .. slot + n - 1;
  the caller keeps slot + n <= L (the decoding engine sizes its caches so; past L,
  dynamic_update_slice would shift the write back while the kernel drops the extra rows). -> (out [B, n, Hq, D], k cache, v cache). The kernel attends to the cache
  below `slot` and to the new tokens from its inputs, and writes them into the cache buffers in
  place (aliased), so a decode step needs no separate cache-write kernels; 'xla' writes with
  dynamic_update_slice and runs the reference. Both give the same caches and the same
  attention up to float32 summation order.

  rotary: None, or the rotary tables (cos, sin) [B, n, D/2] of the new tokens' positions
  (effjax.models.rope.rope_tables): q and k_new are then before the rotary embedding, and both
  are rotated (effjax.models.rope.rotate) before anything else; the kernel does it itself, so
  the step needs no separate rotary kernels either (head dims below 32 rotate outside it)."""
  _check_shapes(q_bnhd, k_blkd, v_blkd)
  b, n, heads, d = q_bnhd.shape
  _, length, kv_heads, _ = k_blkd.shape
  if k_new.shape != (b, n, kv_heads, d) or v_new.shape != k_new.shape:
    raise ValueError(f'decode attention: new keys and values must be [B, n, Hkv, D] = '
                     f'{(b, n, kv_heads, d)}; got {k_new.shape} and {v_new.shape}')
  if rotary is not None and any(t.shape != (b, n, d // 2) for t in rotary):
    raise ValueError(f'decode attention: rotary cos / sin must be [B, n, D/2] = '
                     f'{(b, n, d // 2)}; got {[t.shape for t in rotary]}')
  start_b = jnp.asarray(start_b, jnp.int32).reshape(b)
  slot = jnp.asarray(slot, jnp.int32)
  if _backend_for(backend, n, heads, kv_heads, d, k_blkd.dtype) == 'xla':
    if rotary is not None:
      q_bnhd, k_new = rope.rotate(q_bnhd, *rotary), rope.rotate(k_new, *rotary)
    k_blkd, v_blkd = write_cache(k_blkd, v_blkd, k_new, v_new, slot)
    return decode_attention_reference(q_bnhd, k_blkd, v_blkd, start_b, slot), k_blkd, v_blkd

  from effjax.kernels.decode_attention import gpu
  if rotary is not None and d < 2 * gpu.MIN_TILE:
    q_bnhd, k_new, rotary = rope.rotate(q_bnhd, *rotary), rope.rotate(k_new, *rotary), None
  group = heads // kv_heads
  block_k, split, warps, stages = resolve_tiling(tiling, b, kv_heads, length)
  out, m, l, k_blkd, v_blkd = gpu.partials_writing(
      _grouped_rows(q_bnhd, kv_heads), k_new, v_new, k_blkd, v_blkd, start_b, slot.reshape(1),
      n=n, group=group, block_k=block_k, split=split, rotary=rotary, num_warps=warps,
      num_stages=stages, interpret=interpret)
  merged = out if m is None else gpu.merge(out, m, l, n * group)
  return _ungrouped(merged, q_bnhd, kv_heads), k_blkd, v_blkd
