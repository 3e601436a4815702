"""The kernel's tiling constants tried on the real decode step rather than on isolated products.

    python experiments/quantized_matmul/tune_decode.py [--config=configs/gpt_1b.py]
        [--kinds=int8,int4] [--settings=128:256:256,128:64:128,...] [--gemv | --nk] [--out=DIR]

A setting is DEFAULT_BN:DEFAULT_BK:TARGET_PROGRAMS of effjax/kernels/quantized_matmul (the widest
column tile, the K step, and how many programs split-K may aim for; `default_tiling` fits them
to each product's shape). With --gemv the single row takes the one-row GEMV kernels and the
settings are their constants (DEFAULT_GEMV_BN, DEFAULT_GEMV_BK, TARGET_GEMV_PROGRAMS); there the
third field may also be `sN`: split K so that every program runs N K steps where the shape
allows it (the largest split of K's steps giving at least N steps a program), whatever the
program count. With --nk every quantized weight is stored output-major for decoding
(infer.qmm_output_major) and a setting is BN:BK, the output-major GEMV kernels' row tile and K
step for that kind (DEFAULT_GEMV_NK_BN, DEFAULT_GEMV_NK_BK; no split) with the kind's default
widening (gpu.DEFAULT_NK_WIDEN: int8 'magic', int4 'words'), or BN:BK:WIDEN with WIDEN 'magic',
'convert', 'words' or 'words_x' (gpu.NK_WIDEN: how the integers become floats; 'words_x' also
gathers x into word order inside the kernel); a suffix @K applies the
row tile and K step to the products of input width K only (DEFAULT_GEMV_NK_BY_K; the widening
still to all), e.g. 4:512@5632 for gpt_1b's down projection. For each kind and
setting the model (random weights) is quantized
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
DEFAULT_GEMV_SETTINGS = '128:64:512,128:32:256,128:32:s4,128:64:s4,128:32:s2,256:32:s4,128:64:1024'
DEFAULT_NK_SETTINGS = ('8:512,8:512:magic,8:512:words,8:512:convert,4:512,16:256,8:256,16:512,'
                       '4:1024')
# effjax.kernels.quantized_matmul.gpu.NK_WIDEN_CHOICES
NK_WIDEN_CHOICES = ('magic', 'convert', 'words', 'words_x')


def parse_setting(text: str, gemv: bool, nk: bool = False) -> tuple[int, int, int | str | None]:
  """'BN:BK:TARGET' (or, with --gemv, 'BN:BK:sN') as (bn, bk, target or 'sN'); with nk,
  'BN:BK' as (bn, bk, None) and 'BN:BK:WIDEN' as (bn, bk, WIDEN)."""
  parts = text.split(':')
  if nk:
    try:
      widen = parts[2] if len(parts) == 3 else None
      if len(parts) not in (2, 3) or (widen is not None and widen not in NK_WIDEN_CHOICES):
        raise ValueError
      bn, bk = int(parts[0]), int(parts[1])
      if bn < 1 or bk < 1:
        raise ValueError
      return bn, bk, widen
    except ValueError:
      raise SystemExit(f'--settings: {text!r} is not BN:BK or BN:BK:WIDEN (WIDEN one of '
                       f'{", ".join(NK_WIDEN_CHOICES)}) with whole numbers >= 1 (--nk)') from None
  try:
    if len(parts) != 3:
      raise ValueError
    bn, bk, third = int(parts[0]), int(parts[1]), parts[2]
    if gemv and third.startswith('s'):
      if int(third[1:]) < 1:
        raise ValueError
      return bn, bk, third
    return bn, bk, int(third)
  except ValueError:
    raise SystemExit(f'--settings: {text!r} is not BN:BK:TARGET' +
                     (' or BN:BK:sN (N >= 1 K steps a program)' if gemv else '') +
                     ' with whole numbers') from None


def parse_width(text: str, nk: bool) -> int | None:
  """The K of a setting's '@K' suffix (--nk only), or None without one."""
  if '@' not in text:
    return None
  width = text.partition('@')[2]
  if not nk or not width.isdigit() or int(width) < 1:
    raise SystemExit(f'--settings: {text!r}: a suffix @K (K a whole number >= 1, the input '
                     'width whose products take the setting) is for --nk only')
  return int(width)


def steps_tiling(qmm, steps: int):
  """A stand-in for qmm.default_gemv_tiling choosing split from steps per program."""
  original = qmm.default_gemv_tiling

  def tiling(kind, k, n, group=None):
    bn, bk, _ = original(kind, k, n, group)
    count = k // bk
    split = max(d for d in range(1, count + 1) if count % d == 0 and (count // d >= steps or d == 1))
    return bn, bk, split
  return tiling


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--config', default='configs/gpt_1b.py')
  parser.add_argument('--kinds', default='int8,int4')
  parser.add_argument('--settings', default='',
                      help=f'default: {DEFAULT_SETTINGS}; with --gemv: {DEFAULT_GEMV_SETTINGS}')
  parser.add_argument('--gemv', action='store_true',
                      help='tune the one-row GEMV kernels (compress.qmm_gemv set to each kind)')
  parser.add_argument('--nk', action='store_true',
                      help='tune the output-major GEMV kernels (infer.qmm_output_major)')
  parser.add_argument('--output_major', default='wo', help="weights stored transposed for "
                      "decoding (infer.output_major), as decode.py; '' for none")
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
  if args.gemv and args.nk:
    raise SystemExit('--gemv and --nk tune different kernels: give one')
  text = args.settings or (DEFAULT_NK_SETTINGS if args.nk else
                           DEFAULT_GEMV_SETTINGS if args.gemv else DEFAULT_SETTINGS)
  settings = [(*parse_setting(s.partition('@')[0], args.gemv, args.nk), parse_width(s, args.nk))
              for s in text.split(',')]
  names = (('DEFAULT_GEMV_NK_BN', 'DEFAULT_GEMV_NK_BK', None, 'default_gemv_nk_tiling')
           if args.nk else
           ('DEFAULT_GEMV_BN', 'DEFAULT_GEMV_BK', 'TARGET_GEMV_PROGRAMS', 'default_gemv_tiling')
           if args.gemv else ('DEFAULT_BN', 'DEFAULT_BK', 'TARGET_PROGRAMS', 'default_tiling'))
  defaults = {name: getattr(qmm, name) for name in names + (('DEFAULT_GEMV_NK_BY_K',)
                                                             if args.nk else ()) if name}
  defaults = {name: dict(v) if isinstance(v, dict) else v for name, v in defaults.items()}
  rows = []

  def time_params(graphdef, params):
    return decode_bench.time_decode(graphdef, params, args.context, steps=args.steps, batch=1,
                                    repeats=args.repeats,
                                    output_major=w_lib.parse_names(args.output_major),
                                    qmm_output_major=('int8', 'int4') if args.nk else ())

  from effjax.kernels.quantized_matmul import gpu
  widen_default = gpu.NK_WIDEN

  def restore():
    gpu.NK_WIDEN = widen_default
    for name, value in defaults.items():
      if isinstance(value, dict):
        getattr(qmm, name).clear()
        getattr(qmm, name).update(value)
      else:
        setattr(qmm, name, value)

  def tiling_of(kind, k, n, group):
    if args.nk:
      return qmm.default_gemv_nk_tiling(kind, k, n, group)
    if args.gemv:
      return qmm.default_gemv_tiling(kind, k, n, group)
    return qmm.default_tiling(kind, 1, k, n, group)

  model = LM(config.model, rngs=nnx.Rngs(config.seed))
  graphdef, params = nnx.split(model)
  base = time_params(graphdef, compress_run.decode_params(params, config.model.compute_dtype))
  rows.append({'kind': 'bf16', 'setting': '-', **base})
  print(f"[tune] bf16: {base['ms_per_step']:.3f} ms/step", flush=True)
  del model, params
  for kind in args.kinds.split(','):
    c = config.copy_and_resolve_references()
    c.compress.method, c.compress.qmm_backend = kind, args.backend
    if args.gemv:
      c.compress.qmm_gemv = kind
    model = LM(c.model, rngs=nnx.Rngs(c.seed))
    w_lib.restructure(model, c)
    graphdef, params = nnx.split(model)
    params = compress_run.decode_params(params, c.model.compute_dtype)
    del model
    for bn, bk, target, width in settings:
      row = {'kind': kind, 'setting': ':'.join(str(v) for v in (bn, bk, target)
                                                if v is not None) + (f'@{width}' if width else '')}
      if width:  # this input width only; the kind's limits stay
        qmm.DEFAULT_GEMV_NK_BY_K[(kind, width)] = (bn, bk)
      else:
        getattr(qmm, names[1]).update({kind: bk})
      if args.nk:  # no split to choose; the third field is the widening
        if not width:
          getattr(qmm, names[0]).update({kind: bn})
        gpu.NK_WIDEN = target or widen_default
      else:
        setattr(qmm, names[0], bn)
        if isinstance(target, str):  # 'sN': N K steps a program
          setattr(qmm, names[3], steps_tiling(qmm, int(target[1:])))
        else:
          setattr(qmm, names[2], target)
      try:
        group = c.compress.int4_group_size if kind == 'int4' else None
        row['tilings'] = {f'{k}x{n}': tiling_of(kind, k, n, group)
                          for k, n in ((2048, 2048), (2048, 5632), (5632, 2048))}
        row.update(time_params(graphdef, params))  # a fresh trace: the constants are read then
        row['speedup_vs_bf16'] = base['ms_per_step'] / row['ms_per_step']
      except Exception as e:  # pylint: disable=broad-except  (a failing setting is a result)
        row['error'] = f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'
      finally:
        restore()
      rows.append(row)
      print(f"[tune] {kind} {row['setting']}: " + (row.get('error') or
            f"{row['ms_per_step']:.3f} ms/step, {row['speedup_vs_bf16']:.2f}x bf16 "
            f"{row['tilings']}"), flush=True)
  for r in rows:
    r['tilings_text'] = ' / '.join(str(t) for t in r.get('tilings', {}).values()) or None
  env = {**results.environment(), 'command': 'python ' + ' '.join(sys.argv),
         'config': args.config, 'set': args.set, 'gemv': args.gemv, 'nk': args.nk,
         'output_major': args.output_major}
  columns = (('kind', 'kind', ''), ('setting', 'BN:BK:TARGET', ''),
             ('tilings_text', 'tilings (bn, bk, split) at 2048x2048 / 2048x5632 / 5632x2048', ''),
             ('ms_per_step', 'ms / token', '.3f'), ('speedup_vs_bf16', 'vs bf16', '.2f'),
             ('error', 'error', ''))
  stem = 'tune_decode_nk' if args.nk else 'tune_decode_gemv' if args.gemv else 'tune_decode'
  what = 'output-major GEMV ' if args.nk else 'GEMV ' if args.gemv else ''
  _, md_path = results.write(args.out, stem, env, rows, columns, f'Quantized-matmul {what}'
                             f'tiling on the batch-1 decode step, {args.config}')
  print(open(md_path, encoding='utf-8').read())


if __name__ == '__main__':
  main()
