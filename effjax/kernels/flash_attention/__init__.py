"""Block-sparse flash attention: one op, several backends, one specification.

`flash_attention` computes softmax attention with causal, sliding-window, segment-id and
block-layout masks (see reference.py for the exact semantics) on q [B, S, Hq, D] and k, v
[B, S, Hkv, D]. The Pallas kernels visit only the [block_q, block_k] tiles that hold an allowed
(query, key) pair (layout.computed_blocks), so sparse layouts cost proportionally less.

Backends: 'triton' (Pallas Triton on GPU, gpu.py), 'mosaic_gpu' (Pallas Mosaic GPU on Hopper:
TMA and wgmma, warp-specialised, mosaic_gpu.py; at head dim 256 its backward splits the head
dim over its warpgroups, EFFJAX_MOSAIC_GPU_BWD_D256=triton takes Triton's instead), 'mosaic'
(Pallas on TPU, tpu.py), 'reference' (plain jnp, any device) and 'auto', which picks by the
default JAX backend and the call (resolve_backend): 'mosaic_gpu' on Hopper where its kernel takes
the call (16-bit inputs, S and every block a multiple of 128), else 'triton' on GPU, 'mosaic' on
TPU and 'reference' elsewhere. The op is differentiable in q, k and v through a custom VJP: the forward saves (out, logsumexp) and the backward runs the
backend's own backward kernels, recomputing the probabilities tile by tile.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp

from effjax.kernels.flash_attention.layout import (
  BlockLayout,
  attention_flops,
  bigbird_layout,
  block_csr,
  computed_blocks,
  mask_fraction,
)
from effjax.kernels.flash_attention.reference import (
  attention_mask,
  attention_reference,
  attention_reference_with_lse,
)

__all__ = [
  'KERNEL_BACKENDS',
  'BlockLayout',
  'attention_flops',
  'attention_mask',
  'attention_reference',
  'bigbird_layout',
  'block_csr',
  'computed_blocks',
  'flash_attention',
  'mask_fraction',
]

# The accepted values of `backend`.
KERNEL_BACKENDS = ('auto', 'triton', 'mosaic_gpu', 'mosaic', 'reference')
HEAD_DIMS = (64, 128, 256)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
_MIN_TRITON_BLOCK = 16  # Triton's matmul tiles are at least 16 x 16
_MOSAIC_BLOCK = 128  # TPU tiles span whole 128-lane vregs


def hopper() -> bool:
  """Whether the default device is a Hopper GPU (sm_90, the wgmma/TMA generation)."""
  if jax.default_backend() != 'gpu':
    return False
  capability = str(getattr(jax.devices()[0], 'compute_capability', ''))
  return capability.split('.')[0] == '9'


def mosaic_gpu_takes(*, dtype=None, seq_len: int | None = None, layout_block: int | None = None,
                     block_q: int | None = None, block_k: int | None = None) -> bool:
  """Whether the Mosaic GPU kernel runs a call with these properties (None = not constrained).

  It computes in bfloat16 / float16, tiles queries by exactly 128 rows and keys by a multiple of
  64 up to 256, so S and a layout's block must divide by 128.
  """
  if dtype is not None and jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16),
                                                    jnp.dtype(jnp.float16)):
    return False
  if block_q is not None and block_q != 128:
    return False
  if block_k is not None and (block_k % 64 or block_k > 256):
    return False
  return all(n is None or n % 128 == 0 for n in (seq_len, layout_block))


def resolve_backend(backend: str, **call) -> str:
  """The backend a call runs on: explicit names are kept; 'auto' -> 'mosaic' on TPU, on GPU
  'mosaic_gpu' for a Hopper device and a call its kernel takes (`call`: the keywords of
  mosaic_gpu_takes, dtype always among them when known), else 'triton'; 'reference' elsewhere.
  """
  if backend not in KERNEL_BACKENDS:
    raise ValueError(f'backend must be one of {KERNEL_BACKENDS}, got {backend!r}')
  if backend != 'auto':
    return backend
  platform = jax.default_backend()
  if platform == 'gpu':
    known = call.get('dtype') is not None
    return 'mosaic_gpu' if known and hopper() and mosaic_gpu_takes(**call) else 'triton'
  return {'tpu': 'mosaic'}.get(platform, 'reference')


def _kernel_module(backend: str):
  if backend == 'triton':
    from effjax.kernels.flash_attention import gpu
    return gpu
  if backend == 'mosaic_gpu':
    from effjax.kernels.flash_attention import mosaic_gpu
    return mosaic_gpu
  from effjax.kernels.flash_attention import tpu
  return tpu


def default_blocks(backend: str, head_dim: int) -> tuple[int, int]:
  """(block_q, block_k) a backend starts from before fitting them to S and the layout."""
  if backend == 'reference':
    return 128, 128  # unused: the reference has no tiles
  module = _kernel_module(backend)
  if hasattr(module, 'default_blocks'):
    return module.default_blocks(head_dim)
  return 128, 128


def _fit_block(block: int, seq_len: int, layout: BlockLayout | None, smallest: int) -> int:
  """Halve a default block until it divides S and the layout block (explicit blocks are kept)."""
  while block > smallest and (seq_len % block or (layout is not None and layout.block % block)):
    block //= 2
  return block


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything the op needs besides arrays; hashable so it can be a custom_vjp nondiff arg."""
  backend: str
  causal: bool
  window: int | None
  layout: BlockLayout | None
  scale: float
  block_q: int
  block_k: int
  interpret: bool

  def kernel_kwargs(self, seq_len: int) -> dict:
    blocks = computed_blocks(seq_len, self.block_q, self.block_k, causal=self.causal,
                             window=self.window, layout=self.layout)
    return {'causal': self.causal, 'window': self.window, 'blocks': blocks, 'scale': self.scale,
                'block_q': self.block_q, 'block_k': self.block_k, 'interpret': self.interpret}

  def reference_kwargs(self) -> dict:
    return {'causal': self.causal, 'window': self.window, 'layout': self.layout, 'scale': self.scale}


def _forward(q, k, v, segment_ids, static: _Static):
  if static.backend == 'reference':
    return attention_reference_with_lse(q, k, v, segment_ids=segment_ids,
                                        **static.reference_kwargs())
  module = _kernel_module(static.backend)
  return module.fwd(q, k, v, segment_ids, **static.kernel_kwargs(q.shape[1]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, segment_ids, static: _Static):
  return _forward(q, k, v, segment_ids, static)[0]


def _attention_fwd(q, k, v, segment_ids, static: _Static):
  out, lse = _forward(q, k, v, segment_ids, static)
  return out, (q, k, v, segment_ids, out, lse)


def _attention_bwd(static: _Static, residuals, d_out):
  q, k, v, segment_ids, out, lse = residuals
  if static.backend == 'reference':
    _, vjp = jax.vjp(
        lambda q, k, v: attention_reference(q, k, v, segment_ids=segment_ids,
                                            **static.reference_kwargs()), q, k, v)
    dq, dk, dv = vjp(d_out)
  else:
    module = _kernel_module(static.backend)
    dq, dk, dv = module.bwd(q, k, v, segment_ids, out, lse, d_out,
                            **static.kernel_kwargs(q.shape[1]))
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _check_inputs(q, k, v, segment_ids, window, layout) -> None:
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f'q, k, v must be [batch, seq, heads, head_dim], got shapes {q.shape}, '
                     f'{k.shape}, {v.shape}')
  b, s, hq, d = q.shape
  if k.shape != v.shape or k.shape[0] != b or k.shape[1] != s or k.shape[3] != d:
    raise ValueError(f'k and v must be [{b}, {s}, kv_heads, {d}] to match q {q.shape}, got '
                     f'{k.shape} and {v.shape}')
  if jnp.dtype(q.dtype) not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(f'q, k, v must share one dtype of bfloat16, float16, float32, got '
                     f'{q.dtype}, {k.dtype}, {v.dtype}')
  if hq % k.shape[2]:
    raise ValueError(f'query heads ({hq}) must be a multiple of key/value heads ({k.shape[2]})')
  if segment_ids is not None and (segment_ids.shape != (b, s) or
                                  not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
    raise ValueError(f'segment_ids must be integer [{b}, {s}], got {segment_ids.dtype} '
                     f'{segment_ids.shape}')
  if window is not None and (not isinstance(window, numbers.Integral) or window < 1):
    raise ValueError(f'window must be an int >= 1 or None, got {window!r}')
  if layout is not None and layout.seq_len != s:
    raise ValueError(f'layout covers {layout.seq_len} tokens ({layout.num_blocks} blocks of '
                     f'{layout.block}) but the sequence has {s}')


def _check_kernel(backend: str, seq_len: int, head_dim: int, block_q: int, block_k: int,
                  layout: BlockLayout | None) -> None:
  if head_dim not in HEAD_DIMS:
    raise ValueError(f"head_dim={head_dim} is not supported by backend='{backend}' "
                     f"(allowed: {HEAD_DIMS}); use backend='reference'")
  for name, block in (('block_q', block_q), ('block_k', block_k)):
    if block < 1 or seq_len % block:
      raise ValueError(f"sequence length {seq_len} is not divisible by {name}={block}; pass a "
                       f"{name} dividing {seq_len} or use backend='reference'")
    if layout is not None and layout.block % block:
      raise ValueError(f'layout.block={layout.block} is not a multiple of {name}={block}; pick '
                       f'a {name} dividing {layout.block}')
    if backend == 'triton' and (block < _MIN_TRITON_BLOCK or block & (block - 1)):
      raise ValueError(f"{name}={block} must be a power of two >= {_MIN_TRITON_BLOCK} for "
                       f"backend='triton'; use backend='reference' for other shapes")
    if backend == 'mosaic_gpu':
      _check_mosaic_gpu_block(name, block)
    if backend == 'mosaic' and block % _MOSAIC_BLOCK:
      raise ValueError(f"{name}={block} must be a multiple of {_MOSAIC_BLOCK} for "
                       f"backend='mosaic'; use backend='reference' for other shapes")


def _check_mosaic_gpu_block(name: str, block: int) -> None:
  from effjax.kernels.flash_attention import mosaic_gpu
  if name == 'block_q' and block != mosaic_gpu.BLOCK_Q:
    raise ValueError(f"block_q={block} is not supported by backend='mosaic_gpu', which runs "
                     f"{mosaic_gpu.BLOCK_Q} query rows per CTA (two warpgroups of "
                     f"{mosaic_gpu.WG_ROWS}); leave block_q unset")
  if name == 'block_k' and (block % mosaic_gpu.WG_ROWS or block > 256):
    raise ValueError(f"block_k={block} must be a multiple of {mosaic_gpu.WG_ROWS} and at most "
                     f"256 for backend='mosaic_gpu'")


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                    segment_ids: jax.Array | None = None, causal: bool = True,
                    window: int | None = None, layout: BlockLayout | None = None,
                    scale: float | None = None, block_q: int | None = None,
                    block_k: int | None = None, backend: str = 'auto',
                    interpret: bool = False) -> jax.Array:
  """Masked softmax attention: q [B, S, Hq, D], k and v [B, S, Hkv, D] -> [B, S, Hq, D].

  segment_ids [B, S] int (0 = padding), causal, window and layout combine as in reference.py.
  block_q / block_k default per backend and head dim; interpret=True runs the Pallas kernel in
  interpret mode (CPU tests).
  """
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids)
  _check_inputs(q, k, v, segment_ids, window, layout)
  seq_len, head_dim = q.shape[1], q.shape[3]
  backend = resolve_backend(backend, dtype=q.dtype, seq_len=seq_len,
                            layout_block=None if layout is None else layout.block,
                            block_q=block_q, block_k=block_k)
  default_q, default_k = default_blocks(backend, head_dim)
  smallest = {'triton': _MIN_TRITON_BLOCK, 'mosaic': _MOSAIC_BLOCK, 'mosaic_gpu': 64}.get(
      backend, 1)
  if backend == 'mosaic_gpu' and jnp.dtype(q.dtype) not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"backend='mosaic_gpu' takes bfloat16 or float16 inputs, got {q.dtype}; "
                     f"use backend='triton' for float32")
  if block_q is None:
    # The Mosaic GPU kernel's query block is fixed by its warpgroups: S must divide by it.
    block_q = default_q if backend == 'mosaic_gpu' else _fit_block(default_q, seq_len, layout,
                                                                   smallest)
  block_k = _fit_block(default_k, seq_len, layout, smallest) if block_k is None else block_k
  if backend != 'reference':
    _check_kernel(backend, seq_len, head_dim, block_q, block_k, layout)
  scale = head_dim ** -0.5 if scale is None else float(scale)
  window = None if window is None else int(window)
  static = _Static(backend, bool(causal), window, layout, scale, int(block_q), int(block_k),
                   bool(interpret))
  if segment_ids is not None:
    segment_ids = segment_ids.astype(jnp.int32)
  return _attention(q, k, v, segment_ids, static)
