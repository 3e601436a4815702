"""The decode-attention rows of the kernel benchmark (--op=decode_attention): one decoding step's
attention over a key/value cache.

    python -m effjax.bench kernels --op=decode_attention [--grid=default|tiny]
        [--impls=xla,cudnn,effjax] [--profile_dir=DIR]

A row is q [B, n, Hq, D] (n new tokens: 1 for a decode step, 5 for a speculative verification
pass of gamma 4) against a bf16 cache [B, L, Hkv, D] filled up to its last slot (slot = L - n, the
longest a cache of L gets), every sequence starting at slot 0. Implementations:
  xla     effjax.kernels.decode_attention's reference (plain JAX, masked softmax over all L
          slots): what decoding ran before the kernel, and the baseline;
  cudnn   jax.nn.dot_product_attention(implementation='cudnn') with key_value_seq_lengths
          (n = 1 only: cuDNN aligns a longer query causally from the top-left, not to the end of
          the cache);
  effjax  the Triton kernel (backend 'triton'; off GPU, in interpret mode: the path is checked,
          the time means nothing).
What is timed. A step's attention reads the cache once: a few microseconds for a 1B model at
batch 1, so one timed call runs `products` rows' worth of attention, each on its own cache,
reading about ROTATE_BYTES per call (far beyond the 50 MB L2), as kernels_qmm does. ms is per
product; `bytes` is the cache a product must read (keys and values up to the last slot), GB/s =
bytes / ms; with --profile_dir, profile_ms and device_gb_per_s come from the traced device time,
without the dispatch. Before timing, the first products are checked against the float32
reference (rel_err; beyond 2e-2 the row is marked FAILED and still timed).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from effjax.bench import kernels as kb

IMPLS = ('xla', 'cudnn', 'effjax')
TOLERANCE = 2e-2
CHECKED_PRODUCTS = 2
MAX_PRODUCTS = 64


@dataclasses.dataclass(frozen=True)
class DecodeGrid:
  batches: tuple[int, ...]
  lengths: tuple[int, ...]  # cache slots L
  heads: tuple[tuple[int, int, int], ...]  # (Hq, Hkv, D)
  new_tokens: tuple[int, ...]
  rotate_bytes: int


GRIDS = {
    # configs/gpt_1b.py (16 heads of 128) and a GQA layer (32 query heads on 8 of 128), caches
    # of 1024 / 8192 context + 64 generated tokens.
    'default': DecodeGrid(batches=(1, 16), lengths=(1088, 8256),
                          heads=((16, 16, 128), (32, 8, 128)), new_tokens=(1, 5),
                          rotate_bytes=256 * 2 ** 20),
    'tiny': DecodeGrid(batches=(2,), lengths=(70,), heads=((4, 2, 32),), new_tokens=(1, 3),
                       rotate_bytes=0),
}


def cache_bytes(b: int, n: int, length: int, kv: int, d: int) -> int:
  """Bytes of keys and values a row must read: every slot up to the last one, bf16."""
  del n
  return 2 * b * length * kv * d * 2


def _products(grid: DecodeGrid, nbytes: int) -> int:
  return int(min(MAX_PRODUCTS, max(2, math.ceil(grid.rotate_bytes / nbytes))))


@functools.lru_cache(maxsize=1)
def _inputs(b, n, heads, kv, d, length, products) -> list[tuple]:
  keys = jax.random.split(kb._fresh_key(), kb.INPUT_SETS * products)  # pylint: disable=protected-access
  sets = []
  for i in range(kb.INPUT_SETS):
    ops = []
    for key in keys[i * products:(i + 1) * products]:
      kq, kk, kv_ = jax.random.split(key, 3)
      ops.append((jax.random.normal(kq, (b, n, heads, d), jnp.bfloat16),
                  jax.random.normal(kk, (b, length, kv, d), jnp.bfloat16),
                  jax.random.normal(kv_, (b, length, kv, d), jnp.bfloat16)))
    sets.append((tuple(ops),))
  return sets


def _attend(impl: str):
  """(q, k, v) -> [B, n, Hq, D] for a cache filled to its last slot."""
  from effjax.kernels import decode_attention as da

  def run(q, k, v):
    b, n, length = q.shape[0], q.shape[1], k.shape[1]
    start, slot = jnp.zeros((b,), jnp.int32), jnp.int32(length - n)
    if impl == 'xla':
      return da.decode_attention(q, k, v, start, slot, backend='xla')
    if impl == 'effjax':
      return da.decode_attention(q, k, v, start, slot, backend='triton',
                                 interpret=jax.default_backend() != 'gpu')
    lengths = jnp.full((b,), length, jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths,
                                        implementation='cudnn')
  return run


def _reference(q, k, v):
  from effjax.kernels import decode_attention as da
  f = lambda t: t.astype(jnp.float32)
  b, n, length = q.shape[0], q.shape[1], k.shape[1]
  with jax.default_matmul_precision('highest'):
    return da.decode_attention_reference(f(q), f(k), f(v), jnp.zeros((b,), jnp.int32),
                                         jnp.int32(length - n))


def _check(impl: str):
  def check(fn, input_sets):
    del fn
    attend, reference = jax.jit(_attend(impl)), jax.jit(_reference)
    errors = []
    for args in input_sets[0][0][:CHECKED_PRODUCTS]:
      got, want = attend(*args).astype(jnp.float32), reference(*args)
      errors.append(float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)))
    if not all(np.isfinite(errors)):
      raise AssertionError(f'non-finite result: relative errors {errors}')
    worst = max(errors)
    return {'rel_err': worst, **({'check': 'FAILED'} if worst > TOLERANCE else {})}
  return check


def decode_case(grid: DecodeGrid, impl: str, *, b, n, heads, kv, d, length) -> kb.Case:
  from effjax.kernels import decode_attention as da
  nbytes = cache_bytes(b, n, length, kv, d)
  products = _products(grid, nbytes)
  info: dict[str, Any] = {'batch': b, 'new_tokens': n, 'heads': heads, 'kv_heads': kv,
                          'head_dim': d, 'cache_slots': length, 'bytes': nbytes}
  skip = None
  if impl == 'cudnn':
    if jax.default_backend() != 'gpu':
      skip = 'cuDNN needs a GPU'
    elif n > 1:
      skip = 'cuDNN aligns a multi-token query from the top left, not to the cache end'
  if impl == 'effjax':
    info['tiling'] = list(da.default_tiling(b, kv, length))
    info['interpret'] = jax.default_backend() != 'gpu'
  run = _attend(impl)
  make = lambda: (lambda ops: tuple(run(*a) for a in ops),
                  _inputs(b, n, heads, kv, d, length, products))
  return kb.Case(group=f'B={b} n={n} H={heads}/{kv} D={d} L={length}', variant='decode',
                 impl=impl, mode='fwd', useful_flops=4.0 * b * n * heads * length * d,
                 make=make, info=info, skip=skip, check=_check(impl), products=products)


def decode_cases(grid_name: str, impls: Sequence[str]) -> Iterator[kb.Case]:
  grid = GRIDS[grid_name]
  for heads, kv, d in grid.heads:
    for length in grid.lengths:
      for b in grid.batches:
        for n in grid.new_tokens:
          for impl in impls:
            yield decode_case(grid, impl, b=b, n=n, heads=heads, kv=kv, d=d, length=length)


kb.register(kb.Op(name='decode_attention', impls=IMPLS, baseline='xla', grids=tuple(GRIDS),
                  cases=decode_cases, dense_variant=None))
