"""On a GPU: forward+backward time of the Triton kernels over backward tile caps and warps.

    python experiments/attention_kernels/bwd_sweep.py

Patches gpu.py's module-level backward settings per variant (each variant retraces), at the
benchmark's causal headline shapes.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from effjax.kernels.flash_attention import flash_attention
from effjax.kernels.flash_attention import gpu


def bench(fn, args, repeats=10):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times)) * 1e3


def main():
  original = gpu._compiler_params
  for b, s, h, d in ((4, 4096, 16, 128), (4, 4096, 32, 64)):
    keys = jax.random.split(jax.random.key(np.random.randint(1 << 30)), 4)
    q, k, v, ct = (jax.random.normal(kk, (b, s, h, d), jnp.bfloat16) for kk in keys)
    flops = 3.5 * 4 * b * s * s * h * d / 2
    for cap, warps in ((64, None), (128, None), (64, 4), (32, 4), (128, 4)):
      gpu._BWD_MAX_BLOCK = cap
      def params(head_dim, itemsize, *, forward, _w=warps):
        p = original(head_dim, itemsize, forward=forward)
        return p if forward or _w is None else gpu._CompilerParams(num_warps=_w,
                                                                    num_stages=p.num_stages)
      gpu._compiler_params = params
      grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(
          flash_attention(q, k, v, causal=True).astype(jnp.float32) * ct), (0, 1, 2)))
      try:
        ms = bench(grad, (q, k, v))
        print(f'D{d} bwd cap {cap:3d} warps {warps or "default"}: fwd+bwd {ms:.3f} ms '
              f'{flops / ms / 1e9:.1f} TFLOP/s', flush=True)
      except Exception as e:  # noqa: BLE001
        print(f'D{d} bwd cap {cap} warps {warps}: ERROR {str(e).splitlines()[0][:150]}', flush=True)
  gpu._compiler_params = original


if __name__ == '__main__':
  main()
