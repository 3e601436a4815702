"""On the GPU: the W8A8 routed experts (effjax.models.moe.int8_gmm, int8 x int8 jax.lax.ragged_dot)
against the float32 reference, forward and gradient, at bf16 and float32 inputs.
  python experiments/gpu_smoke/moe_w8a8_check.py"""

import jax
import jax.numpy as jnp
import numpy as np

from effjax.models import moe


def main():
  rng = np.random.default_rng()
  groups, k, n = 8, 512, 256
  sizes = rng.integers(0, 200, groups)
  rows = int(sizes.sum()) + 7
  for dtype in (jnp.float32, jnp.bfloat16):
    x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
    q = jnp.asarray(rng.integers(-127, 128, (groups, k, n)), jnp.int8)
    s = jnp.asarray(rng.uniform(1e-3, 1e-2, (groups, 1, n)), jnp.float32)
    act = jnp.float32(0.8 * float(jnp.max(jnp.abs(x.astype(jnp.float32)))) / 127)
    gs = jnp.asarray(sizes, jnp.int32)
    y = np.asarray(jax.jit(moe.int8_gmm)(x, act, q, s, gs), np.float64)
    xq = np.clip(np.round(np.asarray(x.astype(jnp.float32)) / np.float32(act)), -127, 127)  # f32, as run
    xq = xq.astype(np.float64)
    w = np.asarray(q, np.float64) * np.asarray(s, np.float64)
    want, start = np.zeros((rows, n)), 0
    for g, size in enumerate(sizes):
      want[start:start + size] = xq[start:start + size] @ w[g] * float(act)
      start += size
    err = np.abs(y - want).max() / np.abs(want).max()
    cot = jnp.asarray(rng.standard_normal((rows, n)), jnp.float32)
    dx = jax.jit(jax.grad(lambda x: jnp.sum(moe.int8_gmm(x, act, q, s, gs) * cot)))(x)
    print(f'{jax.devices()[0].device_kind} {jnp.dtype(dtype).name}: forward max relative error '
          f'{err:.2e}; gradient finite {bool(jnp.all(jnp.isfinite(dx)))}, '
          f'nonzero {bool(jnp.any(dx != 0))}')
    assert err < 1e-5, err


if __name__ == '__main__':
  main()
