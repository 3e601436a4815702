"""The chunked-scan rows of the kernel benchmark (--op=scan): GLA / SSD against softmax attention.

    python -m effjax.bench kernels --op=scan [--grid=default|tiny]
        [--impls=effjax,xla,reference,cudnn]

Implementations, in one run on the same inputs:
  effjax     effjax.kernels.chunked_scan, backend 'auto' (Pallas Triton on GPU, Mosaic on TPU);
  xla        the same four chunked steps as plain JAX under the op's custom VJP;
  reference  the chunked form differentiated by JAX itself (the op's specification);
  cudnn      causal softmax attention of the same batch, heads and head dim through
             jax.nn.dot_product_attention (cuDNN on GPU): the baseline, what a linear-time mixer
             has to beat at long sequences.
Two shape variants: 'gla' (H=16 heads, key = value dim 128: GLA / RetNet) and 'ssd' (Mamba-2 with
inner width 2048: H=32 heads of P=64 channels, state N=128, so q, k are [.., 32, 128] and v
[.., 32, 64]; its attention row uses H=32, D=64). Sequence lengths 1k to 32k with B*S = 16k
tokens (B=1 from 16k on), bf16 inputs, float32 log-decays drawn like GLA's gates
(logsigmoid(normal + 3) / 16, slow decays); forward, and forward + backward (all input gradients). The rate that
matters is tokens/s (`mtokens_per_s`, millions); TFLOP/s count the chunked form's matmuls
(per token and head C*(K + V) intra-chunk at half plus 4*K*V for the state, x3 with the
backward) and causal attention at half, so the two columns are not comparable across ops.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp

from effjax.bench import kernels as kb


@dataclasses.dataclass(frozen=True)
class ScanGrid:
  tokens: int  # B * S, while S <= tokens
  seq_lens: tuple[int, ...]
  shapes: tuple[tuple[str, int, int, int], ...]  # (variant, heads, key dim, value dim)


SCAN_GRIDS = {
    'default': ScanGrid(tokens=16384, seq_lens=(1024, 2048, 4096, 8192, 16384, 32768),
                        shapes=(('gla', 16, 128, 128), ('ssd', 32, 128, 64))),
    'tiny': ScanGrid(tokens=256, seq_lens=(64, 128), shapes=(('gla', 2, 16, 16),
                                                             ('ssd', 4, 16, 8))),
}
BACKENDS = {'effjax': 'auto', 'xla': 'xla', 'reference': 'reference'}


@functools.lru_cache(maxsize=1)
def _inputs(b: int, s: int, h: int, dk: int, dv: int) -> list[tuple[jax.Array, ...]]:
  """INPUT_SETS sets of (q, k, v, log-decay, cotangent); only the latest shape is kept alive."""
  keys = jax.random.split(kb._fresh_key(), 5 * kb.INPUT_SETS)  # pylint: disable=protected-access
  sets = []
  for i in range(kb.INPUT_SETS):
    kq, kk, kv, kg, kc = keys[5 * i:5 * i + 5]
    q = jax.random.normal(kq, (b, s, h, dk), jnp.bfloat16)
    k = (jax.random.normal(kk, (b, s, h, dk), jnp.float32) * dk ** -0.5).astype(jnp.bfloat16)
    v = jax.random.normal(kv, (b, s, h, dv), jnp.bfloat16)
    g = jax.nn.log_sigmoid(jax.random.normal(kg, (b, s, h), jnp.float32) + 3.0) / 16.0
    ct = jax.random.normal(kc, (b, s, h, dv), jnp.bfloat16)
    sets.append((q, k, v, g, ct))
  return sets


def _scan_fn(impl: str, mode: str):
  from effjax.kernels.chunked_scan import chunked_scan
  op = functools.partial(chunked_scan, backend=BACKENDS[impl])
  if mode == 'fwd':
    return lambda q, k, v, g, ct: op(q, k, v, g)

  def fwd_bwd(q, k, v, g, ct):
    _, pullback = jax.vjp(op, q, k, v, g)
    return pullback(ct)
  return fwd_bwd


def _attention_fn(mode: str):
  attend = functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation='cudnn')
  if mode == 'fwd':
    return lambda q, k, v, g, ct: attend(q, k, v)

  def fwd_bwd(q, k, v, g, ct):
    _, pullback = jax.vjp(attend, q, k, v)
    return pullback(ct)
  return fwd_bwd


def scan_flops(b: int, s: int, h: int, dk: int, dv: int, chunk: int) -> float:
  """Forward matmul FLOPs of the chunked form (see the module docstring)."""
  return float(b * s * h * (chunk * (dk + dv) + 4 * dk * dv))


def scan_case(impl: str, mode: str, *, variant: str, batch: int, seq_len: int, heads: int,
              key_dim: int, value_dim: int) -> kb.Case:
  group = f'S={seq_len} B={batch}'
  info: dict[str, Any] = {'batch': batch, 'seq_len': seq_len, 'num_heads': heads,
                          'key_dim': key_dim, 'value_dim': value_dim, 'dtype': 'bfloat16',
                          'tokens': batch * seq_len}
  factor = 3.0 if mode == 'fwd+bwd' else 1.0
  skip = None
  if impl == 'cudnn':
    d = value_dim  # the attention twin: same heads, the value width as its head dim
    flops = kb.dense_flops(batch, seq_len, heads, d, causal=True) * (
        kb.FWD_BWD_FACTOR if mode == 'fwd+bwd' else 1.0)
    info['attention_head_dim'] = d
    if jax.default_backend() != 'gpu':
      skip = f'cuDNN attention needs a GPU; this run is on {jax.default_backend()}'
    make = lambda: (_attention_fn(mode), [(q[..., :d], k[..., :d], v, g, ct) for q, k, v, g, ct
                                          in _inputs(batch, seq_len, heads, key_dim, value_dim)])
  else:
    from effjax.kernels.chunked_scan import default_chunk, resolve_backend
    backend = resolve_backend(BACKENDS[impl])
    chunk = default_chunk(backend)
    info.update(backend=backend, chunk=chunk)
    flops = scan_flops(batch, seq_len, heads, key_dim, value_dim, chunk) * factor
    make = lambda: (_scan_fn(impl, mode), _inputs(batch, seq_len, heads, key_dim, value_dim))
  return kb.Case(group=group, variant=variant, impl=impl, mode=mode, useful_flops=flops,
                 make=make, info=info, skip=skip)


def scan_cases(grid: str, impls: Sequence[str]) -> Iterator[kb.Case]:
  g = SCAN_GRIDS[grid]
  for seq_len in g.seq_lens:
    batch = max(1, g.tokens // seq_len)
    for variant, heads, key_dim, value_dim in g.shapes:
      for mode in kb.MODES:
        for impl in impls:
          yield scan_case(impl, mode, variant=variant, batch=batch, seq_len=seq_len,
                          heads=heads, key_dim=key_dim, value_dim=value_dim)


kb.register(kb.Op(name='scan', impls=('effjax', 'xla', 'reference', 'cudnn'), baseline='cudnn',
                  cases=scan_cases, dense_variant=None))
