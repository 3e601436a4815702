"""On a Hopper GPU: the Mosaic GPU forward's key tile and ring depth, or its main-loop variants,
against cuDNN, causal.

    python experiments/attention_kernels/fwd_sweep.py [--out=FILE] [--shapes=0,2] [--variants]
        [--rounds=25]

Per shape (the targets' D 64 and D 128 rows at S 4k and 16k): cuDNN's forward, then
mosaic_gpu.fwd at block_k 64 / 128 / 256 and ring depths 2-4 (those that fit in shared memory;
the default marked), and the default tiling once more with the softmax scale applied as a
separate multiply (mosaic_gpu.FOLD_SCALE off).

--variants instead first checks the forward with the CHECKED settings of mosaic_gpu.FWD_VARIANTS
(EFFJAX_MOSAIC_GPU_FWD) against the float32 reference on the masks the timed rows do not cover
(GQA at D64, full, window, packed documents, BigBird; output only, relative error norm below
2e-2), then times, at the default tiling, the forward as committed, each variant alone and the
COMBINED settings (and overlap_qk at 128-key tiles where the default is longer), with tokamax's Mosaic GPU attention beside cuDNN when tokamax imports. These
rows are timed in alternation
(effjax.bench.kernels.time_interleaved, --rounds rounds of one call per input set each, in a
fresh order per round): a GPU whose clock drifts within the run (the same forward read 0.89 and
0.94 ms, 2.03 and 2.54 ms, in one earlier sequential run) moves every row alike, and each ratio
is the median of per-round ratios, with its rounds' 25th-75th percentile in brackets.

Each row is checked against cuDNN's output (max |diff| at most TOLERANCE) before it is timed.
The block sweep's times are medians of 40 synchronised calls rotating over 4 input sets
(effjax.bench's timing loop); TFLOP/s count the causal half.
"""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from effjax.bench import kernels as kb
from effjax.kernels.flash_attention import computed_blocks
from effjax.kernels.flash_attention import mosaic_gpu as mg

SHAPES = ((4, 4096, 32, 64), (1, 16384, 32, 64), (4, 4096, 16, 128), (1, 16384, 16, 128))
CALLS = 4
# --variants: the combinations timed besides each variant alone (overlap_qk excludes
# wait_k_in_pv), and the settings checked against the float32 reference first (the variants
# not yet run on a GPU, alone and combined).
COMBINED = ('named_schedule,wait_k_in_pv,order_softmax', 'named_schedule,order_softmax,overlap_qk')
CHECKED = ('overlap_qk', 'named_schedule,order_softmax,overlap_qk')
TOLERANCE = 5e-2  # max |out - cuDNN's out|: a few bf16 steps at outputs of order 1


def _most_stages(d, block_k):
  """k/v slots that fit in shared memory beside q."""
  return int((mg._SMEM_BYTES - mg.BLOCK_Q * d * 2 - 4096) // (4 * block_k * d))


def _timed(fn, sets, repeats=10):
  """Median ms of a call, rotating over the input sets (effjax.bench's timing loop)."""
  _, seconds = kb.time_calls(fn, sets, repeats * len(sets))
  return float(np.median(seconds)) * 1e3


def _cudnn(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn')


def _inputs(b, s, h, d):
  """A shape's input sets, causal FLOPs, cuDNN's output (the checks' reference), row label."""
  keys = jax.random.split(jax.random.key(np.random.randint(1 << 30)), 3 * CALLS)
  sets = [tuple(jax.random.normal(keys[3 * i + j], (b, s, h, d), jnp.bfloat16)
                for j in range(3)) for i in range(CALLS)]
  ref = np.asarray(jax.jit(_cudnn)(*sets[0]), np.float32)
  return sets, 4 * b * s * s * h * d / 2, ref, f'B{b} S{s} H{h} D{d}'


def _cudnn_row(b, s, h, d, lines):
  """_inputs and cuDNN's time; cuDNN's row appended to `lines` and printed."""
  sets, flops, ref, head = _inputs(b, s, h, d)
  base = _timed(_cudnn, sets)
  lines.append(f'{head} cudnn: {base:.3f} ms {flops / base / 1e9:.1f} TFLOP/s')
  print(lines[-1], flush=True)
  return sets, flops, ref, base, head


def check_variants():
  """The forward with the variants on against the float32 reference, output only (module doc)."""
  from effjax.kernels.flash_attention import bigbird_layout, flash_attention
  from effjax.kernels.flash_attention.reference import attention_reference
  cases = (('causal d64 gqa', dict(causal=True), 64, 4, 1, False),
           ('full d128', dict(causal=False), 128, 4, 2, False),
           ('window 128', dict(causal=True, window=128), 128, 2, 2, False),
           ('causal + segments', dict(causal=True), 128, 4, 2, True),
           ('bigbird', dict(causal=True, layout=bigbird_layout(
               512, 128, local_blocks=1, global_blocks=1, random_blocks=1)), 128, 2, 1, False))
  lines, ok = [], True
  for setting in CHECKED:
    os.environ['EFFJAX_MOSAIC_GPU_FWD'] = setting
    for name, kw, d, hq, hkv, segments in cases:
      keys = jax.random.split(jax.random.key(np.random.randint(1 << 30)), 4)
      q, k, v = (jax.random.normal(key, (2, 512, h, d), jnp.bfloat16)
                 for key, h in zip(keys, (hq, hkv, hkv)))
      seg = (jnp.sort(jax.random.randint(keys[3], (2, 512), 0, 3), axis=-1) if segments
             else None)
      got = jax.jit(lambda q, k, v, seg=seg, kw=kw: flash_attention(
          q, k, v, segment_ids=seg, backend='mosaic_gpu', **kw))(q, k, v)
      with jax.default_matmul_precision('highest'):
        want = attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)),
                                   segment_ids=seg, **kw)
      got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
      err = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
      good = bool(np.isfinite(got).all()) and err < 2e-2
      ok &= good
      lines.append(f'check [{setting}] {name}: out {err:.1e} {"ok" if good else "FAIL"}')
      print(lines[-1], flush=True)
  os.environ.pop('EFFJAX_MOSAIC_GPU_FWD')
  return lines, ok


def variants(shapes, rounds):
  """Rows of the --variants sweep (module doc); no timing if a variant fails its check."""
  lines, ok = check_variants()
  if not ok:
    lines.append('a variant failed its check: nothing timed')
    print(lines[-1], flush=True)
    return lines
  runs = [('committed', '')] + [(v, v) for v in mg.FWD_VARIANTS] + [
      (f'{combined} together', combined) for combined in COMBINED]
  tokamax = kb.tokamax_missing() is None
  if not tokamax:
    lines.append(f'no tokamax rows: {kb.tokamax_missing()}')
    print(lines[-1], flush=True)
  for b, s, h, d in shapes:
    sets, flops, ref, head = _inputs(b, s, h, d)
    fns = {'cudnn': _cudnn}
    if tokamax:
      fns['tokamax mosaic'] = lambda q, k, v: kb.import_tokamax().dot_product_attention(
          q, k, v, is_causal=True, implementation='mosaic')
    default_k = mg.default_blocks(d)[1]
    # overlap_qk holds two score tiles: where the default tile is longer than 128 keys (D64's
    # 256), also at 128, which leaves it the registers
    extra = [('overlap_qk at block_k 128', 'overlap_qk', 128)] if default_k > 128 else []
    compiled, errors = {}, {}
    for name, setting, *tile in ([(n, None) for n in fns] + runs + extra):
      label = name if setting is None else f'effjax mosaic_gpu, {name}'
      if setting is not None:
        os.environ['EFFJAX_MOSAIC_GPU_FWD'] = setting  # read when the function is traced
        block_k = tile[0] if tile else default_k
        blocks = computed_blocks(s, mg.BLOCK_Q, block_k, causal=True)
        fns[label] = lambda q, k, v, bk=block_k, bl=blocks: mg.fwd(
            q, k, v, None, causal=True, window=None, blocks=bl, scale=d ** -0.5,
            block_q=mg.BLOCK_Q, block_k=bk)[0]
      try:
        compiled[label] = jax.jit(fns[label]).lower(*sets[0]).compile()
        err = float(np.abs(np.asarray(compiled[label](*sets[0]), np.float32) - ref).max())
        if label != 'cudnn' and not err <= TOLERANCE:
          raise ValueError(f'max |diff| {err:.1e} from cuDNN, above {TOLERANCE}')
        errors[label] = err
      except Exception as e:  # noqa: BLE001  (a row that fails is a row too)
        compiled.pop(label, None)
        lines.append(f'{head} {label}: ERROR {str(e).splitlines()[0][:160]}')
        print(lines[-1], flush=True)
    os.environ.pop('EFFJAX_MOSAIC_GPU_FWD', None)
    if 'cudnn' not in compiled:
      continue
    timed = kb.time_interleaved(compiled, sets, rounds, baseline='cudnn')
    for label, t in timed.items():
      line = (f'{head} {label}: {t["ms"]:.3f} ms {flops / t["ms"] / 1e9:.1f} TFLOP/s, '
              f'{t["ratio"]:.3f}x cuDNN [{kb.spread_text(t)}]')
      if 'tokamax mosaic' in timed and label.startswith('effjax'):
        line += f', {kb.paired_ratio(timed, label, "tokamax mosaic"):.3f}x tokamax'
      if label != 'cudnn':
        line += f', max |diff| {errors[label]:.1e}'
      lines.append(line)
      print(line, flush=True)
  return lines


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', default=None)
  parser.add_argument('--shapes', default='all',
                      help="'all' or indices into SHAPES, comma-separated (0,2: the S 4k rows)")
  parser.add_argument('--variants', action='store_true',
                      help='time the main-loop variants at the default tiling instead')
  parser.add_argument('--rounds', type=int, default=25,
                      help='--variants: rounds of alternating calls (kb.time_interleaved)')
  args = parser.parse_args()
  shapes = SHAPES if args.shapes == 'all' else [SHAPES[int(i)] for i in args.shapes.split(',')]
  lines = [f'{jax.devices()[0].device_kind}, JAX {jax.__version__}']
  print(lines[0], flush=True)
  if args.variants:
    lines += variants(shapes, args.rounds)
    shapes = ()
  for b, s, h, d in shapes:
    sets, flops, ref, base, head = _cudnn_row(b, s, h, d, lines)
    default_k = mg.default_blocks(d)[1]
    default_stages = mg.default_stages(d, default_k)
    runs = [(block_k, stages, True) for block_k in (64, 128, 256)
            for stages in range(2, max(2, min(4, _most_stages(d, block_k))) + 1)]
    for block_k, stages, fold in runs + [(default_k, default_stages, False)]:
      mg.FOLD_SCALE = fold  # read when the forward is traced, in _timed's first call
      blocks = computed_blocks(s, mg.BLOCK_Q, block_k, causal=True)
      tag = ' (default)' if (block_k, stages) == (default_k, default_stages) else ''
      tag += '' if fold else ' scale not folded'
      fwd = lambda q, k, v, _bk=block_k, _st=stages, _bl=blocks: mg.fwd(
          q, k, v, None, causal=True, window=None, blocks=_bl, scale=d ** -0.5,
          block_q=mg.BLOCK_Q, block_k=_bk, stages=_st)[0]
      try:
        err = float(np.abs(np.asarray(jax.jit(fwd)(*sets[0]), np.float32) - ref).max())
        if not err <= TOLERANCE:  # a wrong result is a row, not a time
          raise ValueError(f'max |diff| {err:.1e} from cuDNN, above {TOLERANCE}')
        ms = _timed(fwd, sets)
        lines.append(f'{head} block_k {block_k:3d} stages {stages}{tag}: {ms:.3f} ms '
                     f'{flops / ms / 1e9:.1f} TFLOP/s, {base / ms:.3f}x cuDNN, max |diff| '
                     f'{err:.1e}')
      except Exception as e:  # noqa: BLE001  (a tiling that does not compile is a row too)
        lines.append(f'{head} block_k {block_k:3d} stages {stages}{tag}: ERROR '
                     f'{str(e).splitlines()[0][:160]}')
      print(lines[-1], flush=True)
    mg.FOLD_SCALE = True
  if args.out:
    with open(args.out, 'w') as f:
      f.write('\n'.join(lines) + '\n')


if __name__ == '__main__':
  main()
