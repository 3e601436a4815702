"""Batch-1 (or --batch) decoding of one model stored in bf16, int8 and int4, each quantized product
through the Triton kernel and through XLA's dequantize-and-matmul, in one process.

    python experiments/quantized_matmul/decode.py [--config=configs/gpt_1b.py] [--context=1024]
        [--steps=64] [--repeats=5] [--batch=1]
        [--variants=bf16,int8:xla,int8:triton,int8:triton:unfused,int8:triton:gemv,
                    int4:triton:dot,...]
        [--out=DIR] [--set model.num_layers=2 ...] [--profile_dir=DIR]

The model is the config's, randomly initialised (decode speed does not depend on the values):
'bf16' decodes its float32 parameters cast once to the compute dtype, as --mode=compress's
"before" column does; 'int8:<backend>' and 'int4:<backend>' decode the same parameters after
`effjax.compress.weights.restructure` with compress.method=int8 / int4 (compress.targets, groups
of compress.int4_group_size) and compress.qmm_backend=<backend>, exactly what --mode=compress
writes and --mode=generate reads. The kernel variants run the products that share an input
(q/k/v, gate/up) as one launch each (compress.qmm_fuse); '<kind>:triton:unfused' as a launch per
weight, the path before that. A single row takes the GEMV kernels for the kinds compress.qmm_gemv
names (int4 by default) and the dot kernels otherwise; '<kind>:triton:gemv' and
'<kind>:triton:dot' choose (fused either way); '<kind>:triton:nk' stores every quantized weight
output-major for decoding (infer.qmm_output_major) so a single row takes the output-major GEMV
kernels, one launch per product group with its final output and no split-K sum. A variant
ending in '+kw' (e.g. 'bf16+kw', 'int4:triton:nk+kw') decodes with the decode-attention kernel
writing the new keys and values into the cache itself (infer.cache_write_in_kernel); '+gk' with
the output-major float weights' one-row products through the GEMV kernel
(infer.output_major_kernel); both may be given ('bf16+kw+gk'). With --batch
above 1 every step multiplies that many rows: the kernels take up to 64 rows (the dot kernels;
the GEMV kernels only one), and output-major weights multiply through XLA. Timing is
effjax.bench.decode.time_decode: the caches hold
context + steps positions, one jitted loop of `steps` single-token steps, the median of
`repeats` loops after a warm-up. Writes decode_qmm.json / .md to --out (suffixed if taken, never
overwritten) and prints the table.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def load_config(args):
  from effjax import config as config_lib
  config = config_lib.load_file(os.path.join(ROOT, args.config))
  return config_lib.apply_overrides(config, args.set)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--config', default='configs/gpt_1b.py')
  parser.add_argument('--context', type=int, default=1024)
  parser.add_argument('--steps', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--batch', type=int, default=1, help='sequences decoded together')
  parser.add_argument('--variants', default='bf16,int8:xla,int8:triton,int8:triton:unfused,'
                      'int4:xla,int4:triton,int4:triton:unfused')
  parser.add_argument('--out', default='/tmp/effjax_qmm_decode')
  parser.add_argument('--set', action='append', default=[], help='section.field=value override')
  parser.add_argument('--output_major', default='wo', help="weights stored transposed for "
                      "decoding (infer.output_major; '' = the training layout)")
  parser.add_argument('--profile_dir', default='', help='trace one loop of each variant here '
                      '(a subfolder each) and print its device time per kernel')
  args = parser.parse_args()
  if args.batch < 1:
    parser.error(f'--batch={args.batch}: must be at least 1')

  from flax import nnx

  from effjax.bench import decode as decode_bench
  from effjax.bench import results
  from effjax.compress import run as compress_run
  from effjax.compress import weights as w_lib
  from effjax.models.lm import LM

  config = load_config(args)
  rows = []
  for variant in args.variants.split(','):  # every variant checked before any runs
    spec, *extras = variant.split('+')
    if set(extras) - {'kw', 'gk'}:
      raise SystemExit(f"--variants: {variant!r}: the suffixes are '+kw' (the cache written by "
                       "the decode-attention kernel) and '+gk' (the GEMV kernel for output-major "
                       "float weights)")
    if spec.split(':')[2:] not in ([], [''], ['unfused'], ['gemv'], ['dot'], ['nk']):
      raise SystemExit(f"--variants: {variant!r}: the third part may only be 'unfused', "
                       "'gemv', 'dot' or 'nk'")
  for variant in args.variants.split(','):
    spec, *extras = variant.split('+')
    kind, _, rest = spec.partition(':')
    backend, _, mode = rest.partition(':')
    c = config.copy_and_resolve_references()
    model = LM(c.model, rngs=nnx.Rngs(c.seed))
    if kind != 'bf16':
      c.compress.method, c.compress.qmm_backend = kind, backend
      c.compress.qmm_fuse = mode != 'unfused'
      if mode in ('gemv', 'dot'):
        c.compress.qmm_gemv = kind if mode == 'gemv' else ''

      w_lib.restructure(model, c)
    graphdef, params = nnx.split(model)
    params = compress_run.decode_params(params, c.model.compute_dtype)
    row = {'variant': variant, 'bytes_read': compress_run.param_bytes(params)}
    del model
    try:
      row.update(decode_bench.time_decode(graphdef, params, args.context, steps=args.steps,
                                          batch=args.batch, repeats=args.repeats,
                                          output_major=w_lib.parse_names(args.output_major),
                                          qmm_output_major=(kind,) if mode == 'nk' else (),
                                          cache_write_in_kernel='kw' in extras,
                                          output_major_kernel=w_lib.gemv_kernel('gk' in extras),
                                          profile_dir=(os.path.join(args.profile_dir,
                                                                    variant.replace(':', '_'))
                                                       if args.profile_dir else '')))
      if row.get('profile_summary'):
        print(f'--- {variant}: device time per kernel\n{row["profile_summary"]}', flush=True)
    except Exception as e:  # pylint: disable=broad-except  (a failing variant is a result)
      row['error'] = f'{type(e).__name__}: {str(e).splitlines()[0][:300]}'
    rows.append(row)
    print(f'[decode] {variant}: ' + (row.get('error') or f'{row["ms_per_step"]:.3f} ms/step, '
                                     f'{row["tokens_per_s"]:.0f} tokens/s'), flush=True)
  base = next((r for r in rows if r['variant'] == 'bf16' and r.get('tokens_per_s')), None)
  for r in rows:
    if base and r.get('tokens_per_s'):
      r['speedup_vs_bf16'] = r['tokens_per_s'] / base['tokens_per_s']
  env = {**results.environment(), 'command': 'python ' + ' '.join(sys.argv),
         'context': args.context, 'steps': args.steps, 'batch': args.batch, 'config': args.config,
         'set': args.set}
  columns = (('variant', 'variant', ''), ('bytes_read', 'bytes read per token', ''),
             ('ms_per_step', 'ms / step', '.3f'), ('tokens_per_s', 'tokens/s', '.0f'),
             ('speedup_vs_bf16', 'vs bf16', '.2f'), ('error', 'error', ''))
  _, md_path = results.write(args.out, 'decode_qmm', env, rows, columns,
                             f'Batch-{args.batch} decoding, {args.config}, context {args.context}')
  print(open(md_path, encoding='utf-8').read())


if __name__ == '__main__':
  main()
