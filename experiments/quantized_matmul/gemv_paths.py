"""Which formulation of the one-row product (batch-1 decoding) reads int8 / int4 weights fastest?

For gpt_1b's projection shapes (q/k/v fused, o, gate/up fused, down, the head) at M = 1, each
formulation runs over enough different weights per call (at least 512 MB of bf16) that the
products are bound by HBM, not by the 50 MB L2. Wall-clock per product (median of --repeats
calls, divided by the weights a call reads) and the GB/s of the bytes it reads. Formulations:

  bf16_kn         einsum with the bf16 weight [K, N] (what the bf16 decode step does)
  bf16_nk         the same weight stored output-major [N, K]
  int8_kernel     effjax.kernels.quantized_matmul, the Pallas Triton kernel, [K, N]
  int8_xla_kn     XLA: the int8 weight widened inside the product, the per-column scale applied
                  to the [M, N] result (exact reordering for weight-only per-channel scales)
  int8_xla_nk     the same with the int8 weight stored output-major [N, K]
  int4_kernel     the kernel on packed int4 [K/2, N], groups of 64
  int4_xla_nk     XLA: packed int4 stored output-major [N, K/2], unpacked inside the product,
                  partial sums per group scaled then summed
  int4_xla_kn     the same in the stored layout [K/2, N]

Every row is first checked against effjax's float32 reference on the same values.
  python3 experiments/quantized_matmul/gemv_paths.py [--repeats=20] [--out=DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from effjax.kernels import quantized_matmul as qmm
from effjax.kernels.quantized_matmul.reference import unpack_int4

SHAPES = [('qkv', 2048, 6144), ('o', 2048, 2048), ('gate_up', 2048, 11264),
          ('down', 5632, 2048), ('head', 2048, 50304)]
GROUP = 64
BF16 = jnp.bfloat16
F32 = jnp.float32


def int8_xla(x, q, s, output_major):
  eq = 'mk,nk->mn' if output_major else 'mk,kn->mn'
  y = jnp.einsum(eq, x, q.astype(x.dtype), preferred_element_type=F32)
  return (y * s.reshape(1, -1)).astype(x.dtype)


def int4_xla(x, packed, s_gn, output_major):
  """packed [N, K/2] (output_major) or [K/2, N]; scales [K/GROUP, N]."""
  m, k = x.shape
  g = k // GROUP
  xg = x.reshape(m, g, GROUP)
  if output_major:
    q = unpack_int4(packed, axis=1)  # [N, K]
    q = q.reshape(q.shape[0], g, GROUP).astype(x.dtype)
    part = jnp.einsum('mgi,ngi->mgn', xg, q, preferred_element_type=F32)
  else:
    q = unpack_int4(packed, axis=0)  # [K, N]
    q = q.reshape(g, GROUP, q.shape[1]).astype(x.dtype)
    part = jnp.einsum('mgi,gin->mgn', xg, q, preferred_element_type=F32)
  return jnp.sum(part * s_gn[None], axis=1).astype(x.dtype)


def make_weights(kind, k, n, copies, key):
  """(per-copy argument tuples for the formulation, reference arrays of copy 0)."""
  keys = jax.random.split(key, copies)
  out = []
  for kk in keys:
    a, b = jax.random.split(kk)
    if kind == 'bf16':
      w = (jax.random.normal(a, (k, n), F32) / math.sqrt(k)).astype(BF16)
      out.append((w,))
    elif kind == 'int8':
      q = jax.random.randint(a, (k, n), -127, 128, jnp.int8)
      s = jax.random.uniform(b, (1, n), F32, 0.5, 1.5) / (127 * math.sqrt(k))
      out.append((q, s))
    else:
      p = jax.random.randint(a, (k // 2, n), 0, 256, jnp.int32).astype(jnp.uint8)
      s = jax.random.uniform(b, (k // GROUP, n), F32, 0.5, 1.5) / (8 * math.sqrt(k))
      out.append((p, s))
  return out


FORMS = {
  'bf16_kn': ('bf16', lambda x, w: jnp.einsum('mk,kn->mn', x, w[0]), lambda w: w),
  'bf16_nk': ('bf16', lambda x, w: jnp.einsum('mk,nk->mn', x, w[0]), lambda w: (w[0].T,)),
  'int8_kernel': ('int8', lambda x, w: qmm.quantized_matmul(x, w[0], w[1], kind='int8',
                                                            backend='triton'), lambda w: w),
  'int8_xla_kn': ('int8', lambda x, w: int8_xla(x, w[0], w[1], False), lambda w: w),
  'int8_xla_nk': ('int8', lambda x, w: int8_xla(x, w[0], w[1], True), lambda w: (w[0].T, w[1])),
  'int4_kernel': ('int4', lambda x, w: qmm.quantized_matmul(x, w[0], w[1], kind='int4',
                                                            backend='triton'), lambda w: w),
  'int4_xla_kn': ('int4', lambda x, w: int4_xla(x, w[0], w[1], False), lambda w: w),
  'int4_xla_nk': ('int4', lambda x, w: int4_xla(x, w[0], w[1], True), lambda w: (w[0].T, w[1])),
}


def reference(kind, x, w):
  if kind == 'bf16':
    return x.astype(F32) @ w[0].astype(F32)
  if kind == 'int8':
    return qmm.int8_matmul_reference(x, w[0], w[1])
  return qmm.int4_matmul_reference(x, w[0], w[1], GROUP)


def nbytes(ws):
  return sum(a.size * a.dtype.itemsize for w in ws for a in w)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--repeats', type=int, default=20)
  ap.add_argument('--forms', default=','.join(FORMS))
  ap.add_argument('--out', default='')
  args = ap.parse_args()
  forms = args.forms.split(',')
  rows = []
  key = jax.random.key(int(time.time()))
  for name, k, n in SHAPES:
    copies = max(2, math.ceil(512e6 / (k * n * 2)))
    key, kx = jax.random.split(key)
    x = jax.random.normal(kx, (1, k), F32).astype(BF16)
    stored = {}
    for form in forms:
      kind, fn, relayout = FORMS[form]
      if kind not in stored:
        key, kw = jax.random.split(key)
        stored.clear()  # one kind's weights on the device at a time
        stored[kind] = make_weights(kind, k, n, copies, kw)
      ws = stored[kind]
      ref = reference(kind, x, ws[0])
      laid = [relayout(w) for w in ws]
      one = jax.jit(fn)(x, laid[0]).astype(F32)
      err = float(jnp.linalg.norm(one - ref) / jnp.linalg.norm(ref))
      call = jax.jit(lambda x, laid, fn=fn: [fn(x, w) for w in laid])
      jax.block_until_ready(call(x, laid))
      times = []
      for _ in range(args.repeats):
        t = time.perf_counter()
        jax.block_until_ready(call(x, laid))
        times.append(time.perf_counter() - t)
      us = float(np.median(times)) / copies * 1e6
      per = nbytes(laid) / copies
      rows.append(dict(shape=name, k=k, n=n, form=form, us=us, bytes=per,
                       gbs=per / us / 1e3, rel_err=err, copies=copies))
      print(f'{name:8s} {k:5d}x{n:<6d} {form:12s} {us:8.2f} us {per / us / 1e3:7.0f} GB/s '
            f'rel_err {err:.1e}', flush=True)
      del laid
  # The decode step's products (q/k/v, o, gate/up, down per layer, 16 layers, and the head).
  table = ['| form | ' + ' | '.join(f'{s} us' for s, _, _ in SHAPES) +
           ' | 16 layers + head, ms |', '| --- ' * (len(SHAPES) + 2) + '|']
  for form in forms:
    us = {r['shape']: r['us'] for r in rows if r['form'] == form}
    total = (16 * (us['qkv'] + us['o'] + us['gate_up'] + us['down']) + us['head']) / 1e3
    table.append(f'| {form} | ' + ' | '.join(f"{us[s]:.2f}" for s, _, _ in SHAPES) +
                 f' | {total:.3f} |')
  print(f'\n{jax.devices()[0].device_kind}, JAX {jax.__version__}\n' + '\n'.join(table))
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'gemv_paths.json'), 'w') as f:
      json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows), f,
                indent=1)
    with open(os.path.join(args.out, 'gemv_paths.md'), 'w') as f:
      f.write('\n'.join(table) + '\n')


if __name__ == '__main__':
  main()
