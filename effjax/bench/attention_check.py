"""Attention implementations against the float32 reference on random shapes and masks.

The attention benchmark runs this before it times anything (`precheck`): an implementation
whose output or gradients disagree with the reference on the device being measured has its rows
skipped, so no speed is reported for a wrong kernel. `experiments/attention_kernels/gpu_check.py`
runs the same cases from the command line.

One case draws batch, sequence length (a multiple of 128), head dim, kv heads and query group,
and a mask: causal, full, a causal or two-sided window of random width, packed documents (segment
ids with padding, causal) or a BigBird layout; fresh inputs and cotangent every time. Errors are
relative norms ||x - ref|| / ||ref|| of out, dq, dk and dv, the reference run on float32 copies
of the bf16 inputs at 'highest' matmul precision; a case passes when all four are finite and
below `TOLERANCE`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from effjax.kernels import flash_attention as fa

TOLERANCE = 2e-2  # bf16 inputs; measured errors of a correct kernel are about 2e-3
MASKS = ('causal', 'full', 'window', 'window_two_sided', 'segments', 'bigbird')
# What each implementation can express (the peers have no segment ids or block layouts here).
IMPL_MASKS = {'tokamax': ('causal', 'full', 'window'),
              'cudnn': ('causal', 'full', 'window')}


@dataclasses.dataclass(frozen=True)
class CheckCase:
  batch: int
  seq_len: int
  q_heads: int
  kv_heads: int
  head_dim: int
  mask: str
  window: int | None = None
  layout_seed: int | None = None

  @property
  def label(self) -> str:
    extra = f' w={self.window}' if self.window else ''
    return (f'B={self.batch} S={self.seq_len} Hq={self.q_heads} Hkv={self.kv_heads} '
            f'D={self.head_dim} {self.mask}{extra}')

  def mask_kwargs(self, segment_ids) -> dict[str, Any]:
    """flash_attention / attention_reference keyword arguments of this mask."""
    kw: dict[str, Any] = {'causal': self.mask not in ('full', 'window_two_sided')}
    if self.window is not None:
      kw['window'] = self.window
    if self.mask == 'segments':
      kw['segment_ids'] = segment_ids
    if self.mask == 'bigbird':
      kw['layout'] = fa.bigbird_layout(self.seq_len, 128, local_blocks=2, global_blocks=1,
                                       random_blocks=1, seed=self.layout_seed)
    return kw


def random_cases(count: int, *, seq_lens=(256, 512, 1024), head_dims=(64, 128, 256),
                 masks=MASKS, seed: int | None = None) -> list[CheckCase]:
  """`count` cases covering the masks in turn, every other size drawn at random."""
  rng = np.random.default_rng(seed)
  cases = []
  for i in range(count):
    mask = masks[i % len(masks)]
    s = int(rng.choice(seq_lens))
    d = int(rng.choice(head_dims))
    kv_heads = int(rng.integers(1, 3))
    groups = int(rng.choice((1, 2, 4)))
    window = None
    if mask.startswith('window'):
      window = int(rng.integers(1, s))
    cases.append(CheckCase(batch=int(rng.integers(1, 3)), seq_len=s, q_heads=kv_heads * groups,
                           kv_heads=kv_heads, head_dim=d, mask=mask, window=window,
                           layout_seed=int(rng.integers(1000)) if mask == 'bigbird' else None))
  return cases


def _inputs(case: CheckCase, seed: int):
  keys = jax.random.split(jax.random.key(seed), 5)
  b, s, d = case.batch, case.seq_len, case.head_dim
  q = jax.random.normal(keys[0], (b, s, case.q_heads, d), jnp.bfloat16)
  k = jax.random.normal(keys[1], (b, s, case.kv_heads, d), jnp.bfloat16)
  v = jax.random.normal(keys[2], (b, s, case.kv_heads, d), jnp.bfloat16)
  ct = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
  # Sorted document ids with a padding tail (id 0) of random length.
  ids = jnp.sort(jax.random.randint(keys[4], (b, s), 1, 4), axis=-1)
  pad = s - s // 8
  seg = jnp.where(jnp.arange(s)[None] >= pad, 0, ids).astype(jnp.int32)
  return q, k, v, ct, seg


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def attend_fn(impl: str, case: CheckCase, segment_ids) -> Callable[..., jax.Array]:
  """q, k, v -> out through `impl` with the case's mask."""
  kw = case.mask_kwargs(segment_ids)
  if impl.startswith('effjax'):
    backend = {'effjax': 'auto', 'effjax_triton': 'triton',
               'effjax_mosaic_gpu': 'mosaic_gpu'}[impl]
    return functools.partial(fa.flash_attention, backend=backend, **kw)
  if kw.get('window') is not None and not kw['causal']:
    raise ValueError(f'{impl} has no two-sided window here')
  window = kw.get('window')
  local = None if window is None else (window - 1, 0)
  if impl == 'tokamax':
    from effjax.bench.kernels import import_tokamax
    tokamax = import_tokamax()
    return functools.partial(tokamax.dot_product_attention, is_causal=kw['causal'],
                             local_window_size=local, implementation='mosaic')
  return functools.partial(jax.nn.dot_product_attention, is_causal=kw['causal'],
                           local_window_size=local, implementation=impl)


def check_case(impl: str, case: CheckCase, seed: int) -> dict[str, Any]:
  """The relative errors of out, dq, dk, dv and the verdict (fields of a result row)."""
  q, k, v, ct, seg = _inputs(case, seed)
  kw = case.mask_kwargs(seg)
  fn = attend_fn(impl, case, seg)
  ref = functools.partial(fa.attention_reference, **kw)

  def value_and_grads(attend, q, k, v):
    out, pullback = jax.vjp(attend, q, k, v)
    return out, pullback(ct.astype(out.dtype))

  out, grads = jax.jit(functools.partial(value_and_grads, fn))(q, k, v)
  with jax.default_matmul_precision('highest'):
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    out_r, grads_r = jax.jit(functools.partial(value_and_grads, ref))(*f32)
  if case.mask == 'segments':  # padding queries: the op writes 0; cuDNN-style peers do not
    real = np.asarray(seg > 0)[:, :, None, None]
    out, out_r = np.asarray(out, np.float32) * real, np.asarray(out_r) * real
  errs = dict(zip(('out', 'dq', 'dk', 'dv'),
                  [_rel(out, out_r)] + [_rel(g, r) for g, r in zip(grads, grads_r)]))
  finite = all(bool(np.isfinite(np.asarray(x, np.float32)).all()) for x in (out, *grads))
  worst = max(errs.values())
  return {'rel_errs': errs, 'rel_err': worst,
          'check': 'ok' if finite and worst < TOLERANCE else ('FAIL' if finite else 'FAIL nonfinite')}


def needs(impl: str) -> str | None:
  """Why `impl` cannot run on this machine (None: it can)."""
  if impl in ('effjax_triton', 'effjax_mosaic_gpu', 'cudnn', 'tokamax') and (
      jax.default_backend() != 'gpu'):
    return f'{impl} needs a GPU; this run is on {jax.default_backend()}'
  if impl == 'tokamax':
    from effjax.bench.kernels import tokamax_missing
    return tokamax_missing()
  return None
