"""The out projection's one-row product in each weight layout, alone, on the default device.

    python experiments/decode_attention/out_projection.py

A decode step multiplies one row [1, heads * head_dim] by wo. gpt_1b's shape (16 heads of 128,
embed 2048), 32 products chained (each output feeds the next, so none is skipped), bf16; each
variant's median of 20 jitted calls, reported per product, with the bytes of one weight over
that time. Layouts: wo as trained [heads, head_dim, embed], the same reshaped to 2-D [n*h, embed],
and stored output-major ([embed, n*h] and [embed, heads, head_dim], the latter as
infer.output_major stores it), one with a float32 accumulator. Every variant is first checked
against the training layout's product on one weight. Last, whether XLA's switch for turning
small dots into multiply + reduce (xla_gpu_enable_dot_strength_reduction) is accepted as a
per-program compile option.
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

N, H, D, CHAIN, CALLS = 16, 128, 2048, 32, 20


def chain(product):
  def run(x, weights):
    for w in weights:
      x = product(x, w).astype(jnp.bfloat16)
    return x
  return run


VARIANTS = {  # name: (product of a [1, N*H] row and a weight, the weight from wo [N, H, D])
    'trained [n, h, d]': (lambda x, w: jnp.einsum('bnh,nhd->bd', x.reshape(1, N, H), w),
                          lambda w: w),
    '2-D [n*h, d]': (lambda x, w: jnp.einsum('bk,kd->bd', x, w), lambda w: w.reshape(N * H, D)),
    'output-major [d, n*h]': (lambda x, w: jnp.einsum('bk,dk->bd', x, w),
                              lambda w: w.reshape(N * H, D).T.copy()),
    'output-major [d, n*h], f32 accumulator': (
        lambda x, w: jnp.einsum('bk,dk->bd', x, w, preferred_element_type=jnp.float32),
        lambda w: w.reshape(N * H, D).T.copy()),
    'output-major [d, n, h]': (lambda x, w: jnp.einsum('bnh,dnh->bd', x.reshape(1, N, H), w),
                               lambda w: jnp.transpose(w, (2, 0, 1)).copy()),
}


def main():
  print(f'device: {jax.devices()[0].device_kind}, jax {jax.__version__}')
  wo = [jax.random.normal(jax.random.key(i), (N, H, D), jnp.bfloat16) for i in range(CHAIN)]
  x = jax.random.normal(jax.random.key(CHAIN), (1, N * H), jnp.bfloat16)
  want = np.asarray(VARIANTS['trained [n, h, d]'][0](x, wo[0]).astype(jnp.float32))
  for name, (product, layout) in VARIANTS.items():
    weights = [layout(w) for w in wo]
    got = np.asarray(product(x, weights[0]).astype(jnp.float32))
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    run = jax.jit(chain(product))
    run(x, weights).block_until_ready()
    seconds = []
    for _ in range(CALLS):
      t0 = time.perf_counter()
      run(x, weights).block_until_ready()
      seconds.append(time.perf_counter() - t0)
    per = statistics.median(seconds) / CHAIN
    print(f'{name:42s} {per * 1e6:6.1f} us a product, {N * H * D * 2 / per / 1e12:5.2f} TB/s, '
          f'max rel. difference to the trained layout {err:.1e}')
  option = 'xla_gpu_enable_dot_strength_reduction'
  try:
    jax.jit(chain(VARIANTS['trained [n, h, d]'][0]),
            compiler_options={option: False}).lower(x, wo).compile()
    print(f'compile option {option}=False: accepted')
  except Exception as e:  # pylint: disable=broad-except
    print(f'compile option {option}=False: refused ({str(e).splitlines()[0][:120]})')


if __name__ == '__main__':
  main()
