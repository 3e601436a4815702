"""The kernel's tiling constants tried on the real decode step rather than on isolated products.

    python experiments/quantized_matmul/tune_decode.py [--config=configs/gpt_1b.py]
        [--kinds=int8,int4] [--settings=128:256:256,128:64:128,...] [--out=DIR]

A setting is DEFAULT_BN:DEFAULT_BK:TARGET_PROGRAMS of effjax/kernels/quantized_matmul (the widest
column tile, the K step, and how many programs split-K may aim for; `default_tiling` fits them
to each product's shape). For each kind and setting the model (random weights) is quantized
once and its batch-1 decode loop compiled and timed with the constants set, as decode.py times
it, so the figure includes everything around the kernel (launches, padding, split-K sums). The
isolated-product benchmark (`bench kernels --op=qmm`) is dominated by dispatch at these sizes,
which is why this exists. Writes tune_decode.json / .md to --out (suffixed if taken) and prints
the table.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DEFAULT_SETTINGS = ('128:256:256,128:128:512,64:256:512,128:256:64,128:64:128,128:64:256,'
                    '256:128:256,64:128:1024')


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--config', default='configs/gpt_1b.py')
  parser.add_argument('--kinds', default='int8,int4')
  parser.add_argument('--settings', default=DEFAULT_SETTINGS)
  parser.add_argument('--context', type=int, default=1024)
  parser.add_argument('--steps', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--backend', default='triton', help="'triton' (the GPU kernel) or 'xla'")
  parser.add_argument('--out', default='/tmp/effjax_qmm_tune_decode')
  parser.add_argument('--set', action='append', default=[], help='section.field=value override')
  args = parser.parse_args()

  from flax import nnx

  from decode import load_config
  from effjax.bench import decode as decode_bench
  from effjax.bench import results
  from effjax.compress import run as compress_run
  from effjax.compress import weights as w_lib
  from effjax.kernels import quantized_matmul as qmm
  from effjax.models.lm import LM

  config = load_config(args)
  settings = [tuple(int(v) for v in s.split(':')) for s in args.settings.split(',')]
  defaults = (qmm.DEFAULT_BN, dict(qmm.DEFAULT_BK), qmm.TARGET_PROGRAMS)
  rows = []

  def time_params(graphdef, params):
    return decode_bench.time_decode(graphdef, params, args.context, steps=args.steps, batch=1,
                                    repeats=args.repeats)

  model = LM(config.model, rngs=nnx.Rngs(config.seed))
  graphdef, params = nnx.split(model)
  base = time_params(graphdef, compress_run.decode_params(params, config.model.compute_dtype))
  rows.append({'kind': 'bf16', 'setting': '-', **base})
  print(f"[tune] bf16: {base['ms_per_step']:.3f} ms/step", flush=True)
  del model, params
  for kind in args.kinds.split(','):
    c = config.copy_and_resolve_references()
    c.compress.method, c.compress.qmm_backend = kind, args.backend
    model = LM(c.model, rngs=nnx.Rngs(c.seed))
    w_lib.restructure(model, c)
    graphdef, params = nnx.split(model)
    params = compress_run.decode_params(params, c.model.compute_dtype)
    del model
    for bn, bk, target in settings:
      row = {'kind': kind, 'setting': f'{bn}:{bk}:{target}'}
      qmm.DEFAULT_BN, qmm.TARGET_PROGRAMS = bn, target
      qmm.DEFAULT_BK.update({kind: bk})
      try:
        row['tilings'] = {f'{k}x{n}': qmm.default_tiling(kind, 1, k, n, c.compress.int4_group_size
                                                          if kind == 'int4' else None)
                          for k, n in ((2048, 2048), (2048, 5632), (5632, 2048))}
        row.update(time_params(graphdef, params))  # a fresh trace: the constants are read then
        row['speedup_vs_bf16'] = base['ms_per_step'] / row['ms_per_step']
      except Exception as e:  # pylint: disable=broad-except  (a failing setting is a result)
        row['error'] = f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'
      finally:
        qmm.DEFAULT_BN, qmm.TARGET_PROGRAMS = defaults[0], defaults[2]
        qmm.DEFAULT_BK.clear()
        qmm.DEFAULT_BK.update(defaults[1])
      rows.append(row)
      print(f"[tune] {kind} {row['setting']}: " + (row.get('error') or
            f"{row['ms_per_step']:.3f} ms/step, {row['speedup_vs_bf16']:.2f}x bf16 "
            f"{row['tilings']}"), flush=True)
  for r in rows:
    r['tilings_text'] = ' / '.join(str(t) for t in r.get('tilings', {}).values()) or None
  env = {**results.environment(), 'command': 'python ' + ' '.join(sys.argv),
         'config': args.config, 'set': args.set}
  columns = (('kind', 'kind', ''), ('setting', 'BN:BK:TARGET', ''),
             ('tilings_text', 'tilings (bn, bk, split) at 2048x2048 / 2048x5632 / 5632x2048', ''),
             ('ms_per_step', 'ms / token', '.3f'), ('speedup_vs_bf16', 'vs bf16', '.2f'),
             ('error', 'error', ''))
  _, md_path = results.write(args.out, 'tune_decode', env, rows, columns,
                             f'Quantized-matmul tiling on the batch-1 decode step, {args.config}')
  print(open(md_path, encoding='utf-8').read())


if __name__ == '__main__':
  main()
