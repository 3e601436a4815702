"""On a GPU: the kernels against the float32 reference, then a few timings vs cuDNN.

    python experiments/attention_kernels/gpu_check.py [--quick [--d256] | --blocks]
        [--backend=triton|mosaic_gpu] [--random=N]

--backend picks the effjax backend checked and timed (default triton); --random=N adds N random
shape-and-mask cases from effjax/bench/attention_check.py (what the benchmark runs first).
With mosaic_gpu, the checks include the head-dim-split D256 backward and the timings compare it
with the Triton backward and cuDNN (--quick --d256: that timing alone).

Numerics: relative error norms ||x - ref|| / ||ref|| of the output and of dq, dk, dv (bf16 inputs
against the reference on float32 copies at 'highest' matmul precision). Timings: median of
events-synchronised calls, the same shapes as the benchmark's headline point.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from effjax.kernels.flash_attention import bigbird_layout, flash_attention
from effjax.kernels.flash_attention.reference import attention_reference


def _inputs(key, b, s, hq, hkv, d, dtype):
  ks = jax.random.split(key, 5)
  q = jax.random.normal(ks[0], (b, s, hq, d), dtype)
  k = jax.random.normal(ks[1], (b, s, hkv, d), dtype)
  v = jax.random.normal(ks[2], (b, s, hkv, d), dtype)
  ct = jax.random.normal(ks[3], (b, s, hq, d), dtype)
  seg = jnp.sort(jax.random.randint(ks[4], (b, s), 0, 3), axis=-1)  # leading zeros = padding
  return q, k, v, ct, seg


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@contextlib.contextmanager
def _env(values):
  """os.environ updated with `values` inside the block (read when a kernel is traced)."""
  old = {name: os.environ.get(name) for name in values}
  os.environ.update(values)
  try:
    yield
  finally:
    for name, value in old.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value


def check(name, *, b=2, s=512, hq=4, hkv=2, d=128, dtype=jnp.bfloat16, segments=False,
          env=None, **kw):
  with _env(env or {}):
    return _check(name, b=b, s=s, hq=hq, hkv=hkv, d=d, dtype=dtype, segments=segments, **kw)


def _check(name, *, b, s, hq, hkv, d, dtype, segments, **kw):
  q, k, v, ct, seg = _inputs(jax.random.key(np.random.randint(1 << 30)), b, s, hq, hkv, d, dtype)
  seg = seg if segments else None

  def loss(fn, q, k, v):
    out = fn(q, k, v)
    return jnp.sum(out.astype(jnp.float32) * ct.astype(jnp.float32)), out

  kernel = lambda q, k, v: flash_attention(q, k, v, segment_ids=seg, backend=BACKEND, **kw)
  ref = lambda q, k, v: attention_reference(q, k, v, segment_ids=seg, **kw)
  (_, out), grads = jax.jit(jax.value_and_grad(lambda *a: loss(kernel, *a), (0, 1, 2),
                                               has_aux=True))(q, k, v)
  with jax.default_matmul_precision('highest'):
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    (_, out_r), grads_r = jax.jit(jax.value_and_grad(lambda *a: loss(ref, *a), (0, 1, 2),
                                                     has_aux=True))(*f32)
  errs = [_rel(out, out_r)] + [_rel(g, gr) for g, gr in zip(grads, grads_r)]
  finite = all(bool(jnp.all(jnp.isfinite(x))) for x in (out, *grads))
  ok = finite and max(errs) < (2e-2 if dtype != jnp.float32 else 5e-3)
  print(f'{name:34s} out {errs[0]:.1e} dq {errs[1]:.1e} dk {errs[2]:.1e} dv {errs[3]:.1e} '
        f'{"ok" if ok else "FAIL"}', flush=True)
  return ok


def bench(fn, args, repeats=20):
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times)) * 1e3


def timings():
  b, s, h, d = 4, 4096, 16, 128
  q, k, v, ct, _ = _inputs(jax.random.key(1), b, s, h, h, d, jnp.bfloat16)
  flops = 4 * b * s * s * h * d / 2
  impls = {
      'effjax': lambda q, k, v: flash_attention(q, k, v, causal=True, backend=BACKEND),
      'cudnn': lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                            implementation='cudnn'),
  }
  for name, fn in impls.items():
    fwd = bench(fn, (q, k, v))
    grad = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) *
                                            ct.astype(jnp.float32)), (0, 1, 2))
    both = bench(grad, (q, k, v))
    print(f'B4 S4096 H16 D128 causal {name:7s} fwd {fwd:7.3f} ms {flops / fwd / 1e9:6.1f} TFLOP/s'
          f' | fwd+bwd {both:7.3f} ms {3.5 * flops / both / 1e9:6.1f} TFLOP/s', flush=True)
  if BACKEND == 'mosaic_gpu':
    d256_backward_timings()


def d256_backward_timings():
  """fwd+bwd at D 256 with the Triton backward and the head-dim-split Mosaic GPU (the default)
  backward, and cuDNN's, on one shape."""
  b, s, h, d = 2, 4096, 8, 256
  q, k, v, ct, _ = _inputs(jax.random.key(3), b, s, h, h, d, jnp.bfloat16)
  flops = 4 * b * s * s * h * d / 2
  runs = {'bwd triton': ('effjax', 'triton'), 'bwd mosaic_gpu': ('effjax', 'mosaic_gpu'),
          'cudnn': ('cudnn', 'triton')}
  for label, (impl, bwd) in runs.items():
    if impl == 'effjax':
      fn = lambda q, k, v: flash_attention(q, k, v, causal=True, backend=BACKEND)
    else:
      fn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                        implementation='cudnn')
    grad = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) *
                                            ct.astype(jnp.float32)), (0, 1, 2))
    try:
      with _env({'EFFJAX_MOSAIC_GPU_BWD_D256': bwd}):
        both = bench(grad, (q, k, v))
      print(f'B2 S4096 H8 D256 causal {label:15s} fwd+bwd {both:7.3f} ms '
            f'{3.5 * flops / both / 1e9:6.1f} TFLOP/s', flush=True)
    except Exception as e:  # noqa: BLE001
      print(f'B2 S4096 H8 D256 causal {label:15s} ERROR {str(e).splitlines()[0][:200]}',
            flush=True)


def block_sweep():
  """Forward time of the causal headline shape over kernel block sizes (backward tiles fixed)."""
  b, s, h, d = 4, 4096, 16, 128
  q, k, v, _, _ = _inputs(jax.random.key(2), b, s, h, h, d, jnp.bfloat16)
  flops = 4 * b * s * s * h * d / 2
  for bq, bk in ((128, 64), (128, 128), (64, 64), (64, 128)):
    try:
      ms = bench(lambda q, k, v: flash_attention(q, k, v, causal=True, block_q=bq, block_k=bk),
                 (q, k, v))
      print(f'fwd block_q {bq:3d} block_k {bk:3d}: {ms:.3f} ms {flops / ms / 1e9:.1f} TFLOP/s',
            flush=True)
    except Exception as e:  # noqa: BLE001
      print(f'fwd block_q {bq} block_k {bk}: ERROR {str(e).splitlines()[0][:200]}', flush=True)


def _flag(name, default):
  for arg in sys.argv[1:]:
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
  return default


BACKEND = _flag('backend', 'triton')


def main():
  if '--blocks' in sys.argv:
    block_sweep()
    return
  cases = [
      ('causal d128', dict(causal=True)),
      ('causal d64 gqa', dict(causal=True, d=64)),
      ('full d128', dict(causal=False)),
      ('causal + segments', dict(causal=True, segments=True)),
      ('window 128', dict(causal=True, window=128)),
      ('bigbird', dict(causal=True, layout=bigbird_layout(512, 128, local_blocks=2,
                                                          global_blocks=1, random_blocks=1))),
      ('causal d256', dict(causal=True, d=256, s=256)),
  ]
  if BACKEND == 'triton':  # the Mosaic GPU kernel takes bf16 / fp16 only
    cases.append(('causal fp32', dict(causal=True, dtype=jnp.float32, s=256)))
  else:  # the head-dim-split backward at D 256 (the default) and the Triton one it replaced
    split = {'EFFJAX_MOSAIC_GPU_BWD_D256': 'mosaic_gpu'}
    cases.append(('causal d256 triton bwd', dict(causal=True, d=256, s=256,
                                                 env={'EFFJAX_MOSAIC_GPU_BWD_D256': 'triton'})))
    cases += [('causal d256 split bwd', dict(causal=True, d=256, s=512, env=split)),
              ('segments d256 gqa split bwd', dict(causal=True, d=256, s=512, hq=4, hkv=1,
                                                   segments=True, env=split)),
              ('window d256 split bwd', dict(causal=True, d=256, s=512, window=200, env=split))]
  ok = True
  for name, kw in cases:
    try:
      ok &= check(name, **kw)
    except Exception as e:  # noqa: BLE001 -- report and go on to the next case
      ok = False
      print(f'{name:34s} ERROR {type(e).__name__}: {str(e).splitlines()[0][:300]}', flush=True)
  from effjax.bench import attention_check
  impl = {'triton': 'effjax_triton', 'mosaic_gpu': 'effjax_mosaic_gpu'}[BACKEND]
  seed = np.random.randint(1 << 30)
  for i, case in enumerate(attention_check.random_cases(int(_flag('random', '0')), seed=seed)):
    try:
      row = attention_check.check_case(impl, case, seed + i)
      ok &= row['check'] == 'ok'
      errs = ' '.join(f'{k} {v:.1e}' for k, v in row['rel_errs'].items())
      print(f'{case.label:34s} {errs} {row["check"]}', flush=True)
    except Exception as e:  # noqa: BLE001
      ok = False
      print(f'{case.label:34s} ERROR {type(e).__name__}: {str(e).splitlines()[0][:300]}',
            flush=True)
  if '--quick' not in sys.argv:
    timings()
  elif '--d256' in sys.argv:
    d256_backward_timings()
  print('ALL OK' if ok else 'SOME FAILED')


if __name__ == '__main__':
  main()
