"""On a GPU: the weight-only quantized matmul kernel against the float32 reference.

    python experiments/quantized_matmul/gpu_check.py [--quick]
    python experiments/quantized_matmul/gpu_check.py --quick --interpret   # the script on a CPU
    python experiments/quantized_matmul/gpu_check.py --nk   # only the output-major GEMV cases
    python experiments/quantized_matmul/gpu_check.py --nk --widen=words   # with gpu.NK_WIDEN set

For int8 and int4 (groups of 128 and 64), x in bf16, f16 and f32, rows M = 1, 3, 16, 64 and 100
(several row blocks), configs/gpt_1b.py's decode shapes plus shapes that are not multiples of the
default tiles, the default tiling and explicit ones (split 1, wide and narrow tiles, int4 steps
smaller and larger than a group; for the one-row GEMV kernels also int4 groups of 16 and 8 and
K = 72, which only they take; for the output-major GEMV kernels, weights stored [N, K], gpt_1b's
shapes, explicit tilings, a looped K, fused launches and int4 groups of 64 and 8): the op with
backend='triton' (not interpret mode) against the
reference on the same stored values, rel = ||out - ref|| / ||ref||. Then the gradients against
the 'xla' path's, the kernel inside jax.shard_map with check_vma on (the out_struct path), what
backend='auto' picks, and the errors for shapes the kernel cannot tile. Prints one line per
check and exits 1 if any failed. Several weights sharing x in one launch (quantized_matmul_many:
gpt_1b's q/k/v and gate/up) are checked the same way. bf16 / f16 outputs carry their rounding
(about 2e-3); float32 x multiplies in TF32 (Triton's default for float32 dots, like XLA's on this GPU), about 1e-3.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from effjax.kernels import quantized_matmul as qm  # noqa: E402  pylint: disable=wrong-import-position

TOLERANCE = {jnp.bfloat16: 1e-2, jnp.float16: 1e-2, jnp.float32: 5e-3}
FAILURES: list[str] = []
INTERPRET = False  # --interpret: Pallas interpret mode, to try this script without a GPU


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _weights(key, kind, k, n, group):
  kq, ks = jax.random.split(key)
  if kind == 'int8':
    return (jax.random.randint(kq, (k, n), -127, 128, jnp.int8),
            jax.random.uniform(ks, (1, n), jnp.float32, 0.5, 1.5) * k ** -0.5 / 64)
  return (jax.random.bits(kq, (k // 2, n), jnp.uint8),
          jax.random.uniform(ks, (k // group, n), jnp.float32, 0.5, 1.5) * k ** -0.5 / 4)


def _reference(x, q, s, kind, group):
  if kind == 'int8':
    return qm.int8_matmul_reference(x, q, s)
  return qm.int4_matmul_reference(x, q, s, group)


def report(name: str, ok: bool, detail: str) -> None:
  print(f'{"ok  " if ok else "FAIL"} {name}: {detail}', flush=True)
  if not ok:
    FAILURES.append(name)


def _mode(gemv, nk) -> str:
  return ' gemv_nk' if nk else ' gemv' if gemv else ''


def check_values(kind, k, n, m, dtype, *, group=128, tiling=None, gemv=False, nk=False):
  """nk: the weight passed stored output-major (transposed), output_major=True."""
  key = jax.random.key(np.random.randint(1 << 30))
  q, s = _weights(key, kind, k, n, group)
  x = jax.random.normal(jax.random.fold_in(key, 1), (m, k), dtype)
  name = (f'{kind}{"/" + str(group) if kind == "int4" else ""} M={m} K={k} N={n} '
          f'{jnp.dtype(dtype).name} tiling={tiling or "default"}{_mode(gemv, nk)}')
  try:
    fn = jax.jit(lambda x, q, s: qm.quantized_matmul(x, q, s, kind=kind, backend='triton',
                                                     tiling=tiling, interpret=INTERPRET,
                                                     gemv=gemv, output_major=nk))
    out = fn(x, q.T, s.T) if nk else fn(x, q, s)
    rel = _rel(out.astype(jnp.float32), _reference(x, q, s, kind, group))
    plan = qm.plan(kind, m, k, n, group if kind == 'int4' else None, backend='triton',
                   tiling=tiling, gemv=gemv, output_major=nk)
    ok = out.shape == (m, n) and out.dtype == dtype and rel < TOLERANCE[dtype]
    report(name, ok, f'rel {rel:.2e}, tiling {plan.tiling}')
  except Exception as e:  # pylint: disable=broad-except  (a lowering error is a result here)
    report(name, False, f'{type(e).__name__}: {str(e).splitlines()[0][:300]}')


def check_many(kind, k, widths, m, *, group=128, gemv=False, nk=False):
  """Weights sharing x in one launch (quantized_matmul_many) against the reference, each."""
  key = jax.random.key(np.random.randint(1 << 30))
  weights = [_weights(jax.random.fold_in(key, i), kind, k, n, group)
             for i, n in enumerate(widths)]
  stored = [(q.T, s.T) for q, s in weights] if nk else weights
  x = jax.random.normal(jax.random.fold_in(key, 99), (m, k), jnp.bfloat16)
  name = f'{kind} many M={m} K={k} N={"+".join(map(str, widths))}{_mode(gemv, nk)}'
  try:
    outs = jax.jit(lambda x: qm.quantized_matmul_many(x, stored, kind=kind, backend='triton',
                                                      interpret=INTERPRET, gemv=gemv,
                                                      output_major=nk))(x)
    rels = [_rel(o.astype(jnp.float32), _reference(x, q, s, kind, group))
            for o, (q, s) in zip(outs, weights)]
    plan = qm.plan(kind, m, k, widths, group if kind == 'int4' else None, backend='triton',
                   gemv=gemv, output_major=nk)
    report(name, max(rels) < TOLERANCE[jnp.bfloat16],
           f'rel {" ".join(f"{r:.2e}" for r in rels)}, tiling {plan.tiling}')
  except Exception as e:  # pylint: disable=broad-except
    report(name, False, f'{type(e).__name__}: {str(e).splitlines()[0][:300]}')


def check_gradients():
  key = jax.random.key(1)
  q, s = _weights(key, 'int4', 2048, 2048, 128)
  x = jax.random.normal(jax.random.fold_in(key, 1), (4, 2048), jnp.float32)
  ct = jax.random.normal(jax.random.fold_in(key, 2), (4, 2048), jnp.float32)

  def loss(backend):
    return lambda x, s: jnp.sum(ct * qm.quantized_matmul(x, q, s, kind='int4', backend=backend,
                                                         interpret=INTERPRET))
  try:
    got = jax.jit(jax.grad(loss('triton'), argnums=(0, 1)))(x, s)
    want = jax.jit(jax.grad(loss('xla'), argnums=(0, 1)))(x, s)
    rels = [_rel(a, b) for a, b in zip(got, want)]
    report('gradients (x, scale) vs the xla path', max(rels) < 1e-2, f'rel {rels}')
  except Exception as e:  # pylint: disable=broad-except
    report('gradients', False, f'{type(e).__name__}: {str(e).splitlines()[0][:300]}')


def check_shard_map():
  devices = jax.devices()
  mesh = jax.sharding.Mesh(np.array(devices), ('d',))
  key = jax.random.key(2)
  q, s = _weights(key, 'int8', 2048, 2048, None)
  x = jax.random.normal(jax.random.fold_in(key, 1), (len(devices) * 2, 2048), jnp.bfloat16)
  per_device = lambda x, s: qm.quantized_matmul(x, q, s, kind='int8', backend='triton',
                                                interpret=INTERPRET)
  try:
    # check_vma on (the default) on the GPU; Pallas's interpret mode needs it off.
    out = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P('d'), P()),
                                out_specs=P('d'), check_vma=not INTERPRET))(x, s)
    rel = _rel(out.astype(jnp.float32), qm.int8_matmul_reference(x, q, s))
    report(f'shard_map over {len(devices)} device(s), check_vma on', rel < 1e-2, f'rel {rel:.2e}')
  except Exception as e:  # pylint: disable=broad-except
    report('shard_map', False, f'{type(e).__name__}: {str(e).splitlines()[0][:300]}')


def check_dispatch():
  picks = {m: qm.plan('int8', m, 2048, 2048, backend='auto').backend for m in (1, 64, 65)}
  report('auto picks triton up to 64 rows on GPU', picks == {1: 'triton', 64: 'triton',
                                                              65: 'xla'}, str(picks))
  fallback = qm.plan('int8', 1, 2048, 40, backend='auto')
  report('auto falls back for an untileable N', fallback.backend == 'xla', fallback.reason)
  try:
    qm.plan('int4', 1, 2048, 2048, 16, backend='triton')
    report('triton refuses int4 groups of 16', False, 'no error')
  except ValueError as e:
    report('triton refuses int4 groups of 16', True, str(e)[:120])
  small = qm.plan('int4', 1, 2048, 2048, 16, backend='auto', gemv=True)
  report('auto takes the GEMV kernels for one row in int4 groups of 16',
         small.backend == 'triton' and small.gemv, str(small))


def check_one_row(dtypes, tilings, *, gemv=False, nk=False) -> None:
  """A one-row kernel family (the GEMV kernels, gemv; the output-major ones, nk): gpt_1b's shapes
  at every dtype, explicit tilings, a width that is no multiple of the default row / column
  tile, fused q/k/v (also GQA-like) and gate/up, then shapes only the no-dot kernels take: int4
  groups of 64, 16 and 8 and K = 72."""
  for kind in ('int8', 'int4'):
    for k, n in ((2048, 2048), (2048, 5632), (5632, 2048)):
      for dtype in dtypes:
        check_values(kind, k, n, 1, dtype, gemv=gemv, nk=nk)
    for tiling in tilings:
      check_values(kind, 2048, 2048, 1, jnp.bfloat16, tiling=tiling, gemv=gemv, nk=nk)
    check_values(kind, 2048, 80, 1, jnp.bfloat16, gemv=gemv, nk=nk)
    for widths in ((2048, 2048, 2048), (5632, 5632), (2048, 512, 512)):
      check_many(kind, 2048, widths, 1, gemv=gemv, nk=nk)
  for group in (64, 16, 8):
    check_values('int4', 2048, 2048, 1, jnp.bfloat16, group=group, gemv=gemv, nk=nk)
  check_values('int8', 72, 48, 1, jnp.bfloat16, gemv=gemv, nk=nk)
  check_values('int4', 72, 48, 1, jnp.bfloat16, group=8, gemv=gemv, nk=nk)


def main(argv):
  global INTERPRET  # pylint: disable=global-statement
  INTERPRET = '--interpret' in argv
  if jax.default_backend() != 'gpu' and not INTERPRET:
    print(f'needs a GPU; the backend is {jax.default_backend()} (--interpret runs it anyway)')
    return 2
  print(jax.devices()[0].device_kind, 'JAX', jax.__version__, flush=True)
  from effjax.kernels.quantized_matmul import gpu
  for arg in argv:
    if arg.startswith('--widen='):
      widen = arg.split('=', 1)[1]
      if widen not in gpu.NK_WIDEN_CHOICES:
        print(f'--widen={widen!r}: allowed {", ".join(gpu.NK_WIDEN_CHOICES)}')
        return 2
      gpu.NK_WIDEN = widen
      print(f'output-major widening: {widen}')
  # The output-major GEMV kernels (weights stored [N, K]): a row tile of 1, a looped K (32 steps).
  check_one_row((jnp.bfloat16,) if '--quick' in argv else (jnp.bfloat16, jnp.float16, jnp.float32),
                ((1, 512, 1), (4, 1024, 1), (16, 256, 1), (8, 64, 1)), nk=True)
  if '--nk' in argv:
    print(f'{len(FAILURES)} failed' + (': ' + '; '.join(FAILURES) if FAILURES else ''))
    return 1 if FAILURES else 0
  quick = '--quick' in argv
  shapes = ((2048, 2048), (2048, 5632), (5632, 2048)) if not quick else ((2048, 2048),)
  dtypes = (jnp.bfloat16, jnp.float16, jnp.float32) if not quick else (jnp.bfloat16,)
  rows = (1, 3, 16, 64, 100) if not quick else (1, 16)
  for kind in ('int8', 'int4'):
    for k, n in shapes:
      for m in rows:
        for dtype in dtypes:
          check_values(kind, k, n, m, dtype)
    # Not multiples of the default tiles (bn 128, bk 256); int4 groups of 96 (K steps of 32).
    check_values(kind, 208 if kind == 'int8' else 2112, 80, 1, jnp.bfloat16,
                 group=96 if kind == 'int4' else 128)
    for tiling in ((128, 256, 1), (256, 256, 2), (64, 512, 4), (128, 64, 8), (16, 128, 16)):
      check_values(kind, 2048, 2048, 1, jnp.bfloat16, tiling=tiling)
  check_values('int4', 2048, 2048, 1, jnp.bfloat16, group=64, tiling=(128, 256, 2))
  check_values('int4', 2048, 2048, 16, jnp.bfloat16, group=256, tiling=(128, 128, 4))
  if not quick:
    check_values('int4', 4096, 14336, 1, jnp.bfloat16)
    check_values('int8', 4096, 14336, 1, jnp.bfloat16)
  for kind in ('int8', 'int4'):  # gpt_1b's q/k/v and gate/up, and a GQA-like q/k/v
    for m in (1, 16):
      check_many(kind, 2048, (2048, 2048, 2048), m)
      check_many(kind, 2048, (5632, 5632), m)
    check_many(kind, 2048, (2048, 512, 512), 1)
  # The one-row GEMV kernels (gemv=True), then an int4 step larger than its group of 256.
  check_one_row(dtypes, ((64, 128, 2), (128, 32, 16), (256, 32, 4), (128, 64, 1)), gemv=True)
  check_values('int4', 2048, 2048, 1, jnp.bfloat16, group=256, tiling=(128, 128, 2), gemv=True)
  check_gradients()
  check_shard_map()
  if not INTERPRET:
    check_dispatch()
  print(f'{len(FAILURES)} failed' + (': ' + '; '.join(FAILURES) if FAILURES else ''))
  return 1 if FAILURES else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
