"""README.md's "Results so far" table, built from the result files committed under experiments/.

    python experiments/results_table.py           # print the table
    python experiments/results_table.py --write   # replace it in README.md between the markers
    python experiments/results_table.py --check   # exit 1 if README.md differs or a file is missing

Each row names the files it reads (paths relative to the repository root) and a function that
turns them into the 'result' cell: every figure in the table comes from a committed file.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import re
import statistics
import sys
from typing import Callable, Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = 'README.md'
BEGIN = '<!-- results-table:begin -->'
END = '<!-- results-table:end -->'
HEADER = ('| what | machine | result | where |', '| --- | --- | --- | --- |')
FOOTER = ('This table is generated from the result files each row names in\n'
          '[experiments/results_table.py](experiments/results_table.py); after a result file\n'
          'changes, regenerate it with `python experiments/results_table.py --write`\n'
          '(`--check` exits 1 when it is stale).')


# ---------------------------------------------------------------------------------------------
# Readers and formatters.


def load_json(path: pathlib.Path):
  """The parsed JSON file."""
  return json.loads(path.read_text())


def load_jsonl(path: pathlib.Path) -> list[dict]:
  """One dict per non-empty line."""
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def bench_rows(path: pathlib.Path) -> list[dict]:
  """The rows of an `effjax.bench` JSON file."""
  return load_json(path)['rows']


def bench_row(path: pathlib.Path, **match) -> dict:
  """The single bench row whose fields equal `match`."""
  rows = [r for r in bench_rows(path) if all(r.get(k) == v for k, v in match.items())]
  if len(rows) != 1:
    raise ValueError(f'{path}: {len(rows)} rows match {match}')
  return rows[0]


def ok_rows(rows: Sequence[dict]) -> list[dict]:
  """Rows that ran: no error, not skipped."""
  return [r for r in rows if not r.get('error') and not r.get('skipped')]


def md_table(path: pathlib.Path, first_header: str) -> list[dict]:
  """The rows of the first markdown table in `path` whose header starts with `first_header`."""
  lines = path.read_text().splitlines()
  for i, line in enumerate(lines):
    cells = _cells(line)
    if cells and cells[0] == first_header:
      out = []
      for row in lines[i + 2:]:
        if not row.startswith('|'):
          break
        out.append(dict(zip(cells, _cells(row))))
      return out
  raise ValueError(f'{path}: no table headed {first_header!r}')


def _cells(line: str) -> list[str]:
  line = line.strip()
  if not line.startswith('|'):
    return []
  return [c.strip() for c in line.strip('|').split('|')]


def kilo(x: float, digits: int = 1) -> str:
  """562670 -> '562.7K'."""
  return f'{x / 1e3:.{digits}f}K'


def span(values: Sequence[float], digits: int = 2, unit: str = 'x') -> str:
  """'lo-hi' with `unit`, or one number where both round the same."""
  lo, hi = f'{min(values):.{digits}f}', f'{max(values):.{digits}f}'
  return f'{lo}{unit}' if lo == hi else f'{lo}-{hi}{unit}'


def lr_text(lr: float) -> str:
  """0.00075 -> '7.5e-4'."""
  mantissa, exponent = f'{lr:.1e}'.split('e')
  return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def seq_text(s: int) -> str:
  """16384 -> '16k'."""
  return f'{s // 1024}k'


# ---------------------------------------------------------------------------------------------
# One function per row: the row's files in, the 'result' cell out.


def cpu_default(metrics, base_config) -> str:
  """Held-out loss, the uniform loss, median tokens/s of the quickstart run."""
  records = load_jsonl(metrics)
  held_out = [r['eval/loss'] for r in records if 'eval/loss' in r][-1]
  tps = statistics.median(r['train/tokens_per_second'] for r in records
                          if 'train/tokens_per_second' in r)
  vocab = int(re.search(r'vocab_size\s*=\s*(\d+)', base_config.read_text()).group(1))
  timed = [r for r in records if 'train/loss' in r and 'time' in r]
  seconds = timed[-1]['time'] - timed[0]['time']
  return (f'held-out {held_out:.2f} nats/byte (uniform: {math.log(vocab):.2f}), '
          f'{tps / 1e3:.1f}k tokens/s; steps {timed[0]["step"]}-{timed[-1]["step"]} took '
          f'{int(seconds // 60)} min {int(seconds % 60)} s of wall time')


def gpt2_tuned(bench, peer) -> str:
  """Batch-128 tokens/s and MFU, and the ratio to the PyTorch peer at the same batch."""
  row = bench_row(bench, batch_size=128)
  peer_tps = load_json(peer)['tokens_per_second']
  return (f"{kilo(row['tokens_per_second'])} tokens/s, {row['mfu_percent']:.1f}% MFU; "
          f"{row['tokens_per_second'] / peer_tps:.2f}x a torch.compile PyTorch peer "
          'in the same run')


def gpt1b(bench) -> str:
  """Batch-32 tokens/s and MFU of the 1B model."""
  row = bench_row(bench, batch_size=32)
  return f"{kilo(row['tokens_per_second'])} tokens/s, {row['mfu_percent']:.1f}% MFU"


def two_gpu_scaling(one_gpu, data_parallel, fsdp) -> str:
  """Best two-GPU tokens/s of each layout over twice the one-GPU rate."""
  base = 2 * ok_rows(bench_rows(one_gpu))[0]['tokens_per_second']
  dp = max(r['tokens_per_second'] for r in ok_rows(bench_rows(data_parallel))) / base
  fs = max(r['tokens_per_second'] for r in ok_rows(bench_rows(fsdp))) / base
  return f'{dp:.1%} / {fs:.1%} of twice one GPU'


def largest_on_80gb(*benches) -> str:
  """The largest model that trained, and its peak memory per parameter."""
  rows = [r for b in benches for r in ok_rows(bench_rows(b))]
  row = max(rows, key=lambda r: r['params_m'])
  per_param = row['peak_memory_gb'] * 1e9 / (row['params_m'] * 1e6)
  return f"{row['params_m'] / 1e3:.2f}B parameters, {per_param:.1f} bytes per parameter"


def gpt2_untuned(metrics) -> str:
  """Median tokens/s and MFU over the run's log windows."""
  records = [r for r in load_jsonl(metrics) if 'train/tokens_per_second' in r]
  tps = statistics.median(r['train/tokens_per_second'] for r in records)
  mfu = statistics.median(r['train/mfu'] for r in records)
  return f'{kilo(tps, 0)} tokens/s, {mfu:.1%} MFU'


def sophia(results) -> str:
  """Whether any Sophia run reached the best AdamW loss; the refresh's per-step overhead."""
  data = load_json(results)
  runs = [r for r in data['runs'] if r['optimizer'].startswith('sophia')]
  reached = [r for r in runs if r['steps_to_target'] is not None]
  best = min(r['final_loss'] for r in runs)
  over = {r['optimizer']: r['overhead_pct'] for r in runs}
  lead = ('no Sophia run reached' if not reached else
          f'{len(reached)} of {len(runs)} Sophia runs reached')
  return (f"{lead} AdamW's final loss ({best:.2f} vs {data['target']:.3f} nats/byte); "
          f"Sophia-G's refresh costs {over['sophia_g']:+.1f}% a step "
          f"(Sophia-H {over['sophia_h']:+.1f}%)")


def scan_kernel(bench) -> str:
  """Chunked scan fwd+bwd against cuDNN causal attention and its plain-JAX reference."""
  rows = [r for r in ok_rows(bench_rows(bench)) if r['op'] == 'scan' and r['mode'] == 'fwd+bwd']
  ours = [r for r in rows if r['impl'] == 'effjax']
  ref = {(r['group'], r['variant']): r['ms'] for r in rows if r['impl'] == 'reference'}

  def vs_cudnn(keep):
    return [r['speedup_vs_baseline'] for r in ours if keep(r['seq_len'])]

  below = vs_cudnn(lambda s: s < 4096)
  slower = 'slower' if max(below) < 1 else 'not always slower'
  vs_ref = [ref[r['group'], r['variant']] / r['ms'] for r in ours if r['seq_len'] >= 4096]
  return (f'{span(vs_cudnn(lambda s: s == 4096))} at S=4k, '
          f'{span(vs_cudnn(lambda s: s == 16384))} at 16k, '
          f'{span(vs_cudnn(lambda s: s == 32768), 1)} at 32k; '
          f'{slower} below 4k ({span(below)}); '
          f'{span(vs_ref, 1)} its plain-JAX reference from 4k on')


def decode(gla, mamba2, attention) -> str:
  """Decoding tokens/s at every context relative to the shortest one."""
  def rel(path):
    rows = ok_rows(bench_rows(path))
    return rows, [r['relative_to_shortest'] for r in rows]

  drift = max(abs(v - 1) for p in (gla, mamba2) for v in rel(p)[1])
  rows, att = rel(attention)
  return (f'GLA and Mamba-2 within {drift:.0%} of their {seq_text(rows[0]["context"])} rate; '
          f'softmax attention {1 / att[-1]:.0f}x slower at {seq_text(rows[-1]["context"])}')


def mixers_quality(results, results_md) -> str:
  """Final held-out losses of the sequence-mixer study, best run per mixer."""
  runs = {r['name']: r for r in load_json(results)}
  lrs = {r['run']: float(r['peak lr']) for r in md_table(results_md, 'run')}

  def best(pattern):
    return min((r for r in runs.values() if r['pattern'] == pattern),
               key=lambda r: r['final_eval_loss'])

  att, gla = best('attention:mlp'), best('gla:mlp')
  base = runs['attention']
  hybrid = runs['hybrid']
  layers = [p.strip().split(':')[0] for p in hybrid['pattern'].split(',')]
  ratio = f"{layers.count('mamba2')}:{layers.count('attention')}"
  mamba_lrs = sorted({lrs[n] for n, r in runs.items() if 'mamba2' in r['pattern']})
  only = ' or '.join(lr_text(x) for x in mamba_lrs)
  return (f"held-out nats/byte: best attention {att['final_eval_loss']:.3f} "
          f"(lr {lr_text(lrs[att['name']])}; {base['final_eval_loss']:.3f} at "
          f"{lr_text(lrs['attention'])}), GLA {gla['final_eval_loss']:.3f}, "
          f"Mamba-2 x{runs['mamba2']['num_layers']} {runs['mamba2']['final_eval_loss']:.3f}, "
          f"{ratio} Mamba-2/attention hybrid {hybrid['final_eval_loss']:.3f} "
          f"(Mamba runs at {only} only)")


def _tail_mean(series, fraction: float = 0.2) -> float:
  """Mean of the last `fraction` of a [[step, value], ...] series (as analyze.py does)."""
  tail = series[-max(1, int(len(series) * fraction)):]
  return statistics.fmean(v for _, v in tail)


def moe_quality(results) -> str:
  """Final held-out losses of the MoE study, collapse and dropped slots from the last 20%."""
  runs = {r['name']: r for r in load_json(results)}
  loss = {n: r['final_eval_loss'] for n, r in runs.items()}
  collapsed = _tail_mean(runs['moe_8x2_no_aux']['moe_load_min']) < 0.01
  dropped = _tail_mean(runs['switch_8x1_cap1.25']['moe_dropped_fraction'])
  return (f"dense {loss['dense']:.3f} nats/byte; 8x top-2 {loss['moe_8x2']:.3f} "
          f"({loss['moe_8x2_no_aux']:.3f} without the balancing loss"
          f"{', routing collapsed' if collapsed else ''}); "
          f"Switch top-1 cap 1.25: {loss['switch_8x1_cap1.25']:.3f}, {dropped:.1%} dropped")


_CONSOLE = re.compile(r'\[bench\] (M=\d+ G=(\d+) K=\d+ N=\d+) (\w+) (\w+) (fwd\+bwd|fwd): '
                      r'[\d.]+ ms, ([\d.]+) TFLOP/s')


def grouped_matmul(bench, tokamax_log, experts64) -> str:
  """Grouped matmul TFLOP/s against the einsum, ragged_dot and tokamax (uniform groups); the
  64-expert rows from the later run of those shapes alone (experts64), which replace bench's."""
  rows = [r for r in ok_rows(bench_rows(bench)) if r['op'] == 'gmm' and r['groups'] != 64]
  rows += [r for r in ok_rows(bench_rows(experts64)) if r['op'] == 'gmm']
  tflops = {(r['group'], r['variant'], r['impl'], r['mode']): r['tflops'] for r in rows}
  ours = [r for r in rows if r['impl'] == 'effjax' and r['variant'] == 'uniform']

  def vs(impl, groups, mode):
    return [r['tflops'] / tflops[r['group'], 'uniform', impl, r['mode']] for r in ours
            if r['groups'] == groups and r['mode'] == mode]

  ragged = [x for g in (8, 64) for x in vs('ragged_dot', g, 'fwd')]
  printed = {}
  for m in _CONSOLE.finditer(tokamax_log.read_text()):
    group, groups, variant, impl, mode, value = m.groups()
    printed[group, int(groups), variant, mode, impl] = float(value)
  vs_tokamax = {8: [], 64: []}
  for (group, groups, variant, mode, impl), value in printed.items():
    peer = printed.get((group, groups, variant, mode, 'tokamax'))
    if impl == 'effjax' and peer:
      vs_tokamax[groups].append(value / peer)
  return (f"8 experts: {span(vs('einsum', 8, 'fwd'))} fwd, "
          f"{span(vs('einsum', 8, 'fwd+bwd'))} fwd+bwd; "
          f"64 experts (a later run, the current kernel): {span(vs('einsum', 64, 'fwd'))} fwd, "
          f"{span(vs('einsum', 64, 'fwd+bwd'))} fwd+bwd; "
          f"{span(ragged, 0)} `jax.lax.ragged_dot` (fwd); "
          f"vs tokamax (first run's console): {span(vs_tokamax[8], 1)} at 8 experts, "
          f"{span(vs_tokamax[64])} at 64")


MOE_STEP_TARGET = 0.8  # the goal set for the MoE step against its dense twin, not a measurement


def moe_step(latest, earlier, ragged) -> str:
  """MoE training step tokens/s against its dense twin (latest run) and against ragged_dot (the
  earlier run that timed both backends)."""
  moe = bench_row(latest, name='pattern=attention:moe')['tokens_per_second']
  dense = bench_row(latest, name='pattern=attention:mlp')['tokens_per_second']
  moe_then = bench_row(earlier, name='pattern=attention:moe')['tokens_per_second']
  other = ok_rows(bench_rows(ragged))[0]['tokens_per_second']
  verdict = 'met' if moe / dense >= MOE_STEP_TARGET else 'missed'
  return (f'{kilo(moe, 0)} vs {kilo(dense, 0)} tokens/s ({moe / dense:.2f}x; '
          f'target {MOE_STEP_TARGET}x {verdict}); in an earlier run {moe_then / other:.1f}x the '
          'same MoE on `ragged_dot`')


def gpu_smoke(*runs_and_config) -> str:
  """Configs run to the end, failed and skipped over smoke runs (a later run's row wins)."""
  *runs, sharded_cpu = runs_and_config
  state = {}
  for run in runs:
    rows = load_json(run)
    for r in rows['rows'] if isinstance(rows, dict) else rows:
      state[r['config']] = 'skipped' if r.get('skipped') else 'ok' if r.get('ok') else 'FAILED'
  done = sorted(n for n, s in state.items() if s == 'ok')
  skipped = sorted(n for n, s in state.items() if s == 'skipped')
  failed = sorted(n for n, s in state.items() if s == 'FAILED')
  axes = re.findall(r'config\.mesh\.\w+\s*=\s*(\d+)', sharded_cpu.read_text())
  devices = math.prod(int(a) for a in axes)
  skip_note = '; '.join(f'{n} needs {devices} devices' if n == 'sharded_cpu' else f'{n} skipped'
                        for n in skipped)
  text = f"{len(done)} of {len(state)} ran to the end; failed: {', '.join(failed) or 'none'}"
  return f'{text}; {skip_note}' if skip_note else text


def compression_decode(study) -> str:
  """Weight-only PTQ decode speed and loss against the bf16 source."""
  rows = {r['technique'].split(' (')[0]: r for r in load_json(study)['rows']}
  dense = rows['dense source']
  parts = []
  for name, label, target in (('int8 weight-only', 'int8', 1.6),
                              ('int4 weight-only, groups of 64', 'int4', 2.5)):
    r = rows[name]
    speed = r['decode_tokens_per_s'] / dense['decode_tokens_per_s']
    loss = (r['loss'] - dense['loss']) / dense['loss'] * 100
    verdict = 'met' if speed >= target else 'missed'
    parts.append(f'{label} {speed:.2f}x bf16 tokens/s (target {target}x {verdict}), '
                 f'{r["bytes"] / dense["bytes"]:.2f}x the bytes, loss {loss:+.2f}%')
  return '; '.join(parts)


def compression_pruning(study) -> str:
  """2:4 (and magnitude) pruning plus fine-tuning against the dense model fine-tuned the same
  steps (the control): held-out loss and the 5% target."""
  rows = {r['technique'].split(' (')[0].split(',')[0]: r for r in load_json(study)['rows']}
  control = rows['dense']['loss']
  parts = []
  for name, label in (('2:4 structured', '2:4'), ('magnitude 50%', 'magnitude 50%')):
    excess = (rows[name]['loss'] - control) / control * 100
    parts.append(f'{label} {rows[name]["loss"]:.4f} vs control {control:.4f} ({excess:+.1f}%'
                 + (f', target 5% {"met" if excess <= 5 else "missed"})' if label == '2:4' else ')'))
  return '; '.join(parts)


def quantized_decode(decode_qmm, later) -> str:
  """Batch-1 decode tokens/s of int8 / int4 weights through the kernel and through XLA, vs bf16;
  then the kernel rows of a later run with the decode-attention kernel in the step."""
  def ratios(path):
    rows = {r['variant']: r for r in load_json(path)['rows'] if r.get('tokens_per_s')}
    return {k: r['tokens_per_s'] / rows['bf16']['tokens_per_s'] for k, r in rows.items()}
  first, then = ratios(decode_qmm), ratios(later)
  parts = []
  for kind, target in (('int8', 1.6), ('int4', 2.5)):
    kernel = first[f'{kind}:triton']
    verdict = 'met' if max(kernel, then[f'{kind}:triton']) >= target else 'missed'
    parts.append(f'{kind} {kernel:.2f}x bf16 tokens/s through the kernel (target {target}x '
                 f'{verdict}; {first[f"{kind}:xla"]:.2f}x through XLA)')
  return ('; '.join(parts) + '; with the decode-attention kernel also in the step (bf16 faster '
          f"too): int8 {then['int8:triton']:.2f}x, int4 {then['int4:triton']:.2f}x")


LORA_MEMORY_TARGET = 0.4  # the goal: LoRA peak memory as a fraction of full fine-tuning's


def lora_memory(full, lora, full_remat, lora_remat) -> str:
  """LoRA peak memory as a fraction of full fine-tuning, per batch size: float32 base without
  remat, then bf16 base with every block rematerialised on both sides."""
  def compare(full, lora):
    verdicts, parts = [], []
    for f in bench_rows(full):
      r = bench_row(lora, name=f['name'])
      fraction = r['peak_memory_gb'] / f['peak_memory_gb']
      verdicts.append(f"{'met' if fraction <= LORA_MEMORY_TARGET else 'missed'} at batch "
                      f"{f['batch_size']}")
      parts.append(f"{fraction:.0%} at batch {f['batch_size']} "
                   f"({r['peak_memory_gb']:.1f} vs {f['peak_memory_gb']:.1f} GB)")
    return ', '.join(parts), ', '.join(verdicts)
  plain, _ = compare(full, lora)
  remat, verdict = compare(full_remat, lora_remat)
  return (f'float32 base, no remat: {plain}; bf16 base, both rematerialised: {remat} '
          f'(target {LORA_MEMORY_TARGET:.0%}: {verdict})')


def decode_attention_step(kernel, xla) -> str:
  """gpt_1b batch-1 decode ms/token with the decode-attention kernel vs XLA's attention."""
  parts = []
  for context in (1024, 8192):
    k, x = bench_row(kernel, context=context), bench_row(xla, context=context)
    parts.append(f"{seq_text(context)} context {k['ms_per_token']:.3f} vs "
                 f"{x['ms_per_token']:.3f} ms/token ({x['ms_per_token'] / k['ms_per_token']:.2f}x),"
                 f" {k['roofline_fraction']:.0%} of the bandwidth roofline")
  return '; '.join(parts) + ' (target 70% missed)'


def speculative_study(study, speculative=None) -> str:
  """Trained 1B model: self-speculative, speculative and early exit against plain decoding
  (`speculative`: a second file with the speculative rows, when a later run over the same
  checkpoints measured them)."""
  d = load_json(study)
  parts = speculative_parts(speculative or study)
  ok = [r for r in d['rows'] if r['perplexity_increase'] <= 0.02]
  best = max(ok, key=lambda r: r['speedup_vs_plain'])
  verdict = 'met' if best['speedup_vs_plain'] >= 1.5 else 'missed'
  parts.append(f"early exit {best['speedup_vs_plain']:.2f}x at "
               f"{best['perplexity_increase']:+.1%} perplexity (target 1.5x at <= 2% {verdict})")
  return '; '.join(parts) + f" after {d['steps']} training steps"


def speculative_decode_set(study) -> str:
  """The speculative rows of a study whose decoding ran with other settings than its training
  (run_study.py --decode_set)."""
  d = load_json(study)
  return (f"decoded with {', '.join(d['decode_set'])}: " + '; '.join(speculative_parts(study))
          + f" after {d['steps']} training steps")


def speculative_parts(study) -> list[str]:
  """Self-speculative and speculative decoding against plain: speed-up, acceptance, output."""
  spec = {r['method']: r for r in load_json(study)['speculative']}
  parts = []
  for method, label, target in (('self_speculative', 'self-speculative', 1.5),
                                ('speculative', 'speculative (0.15B draft)', 2.0)):
    r = spec[method]
    diffs = r.get('first_differences') or []
    parted = [x for x in diffs if x.get('position') is not None]
    if r['equals_plain_greedy']:
      same = 'identical greedy output'
    elif diffs:
      gap = max(x['relative_gap'] for x in parted)
      same = (f'output identical on {len(diffs) - len(parted)} of {len(diffs)} prompts (first '
              f'difference at a logit gap of {gap:.1e} of the largest)')
    else:
      same = 'output NOT identical'
    parts.append(f"{label} {r['speedup_vs_plain']:.2f}x at acceptance {r['acceptance_rate']:.2f},"
                 f" {same} (target {target}x)")
  return parts


def quantized_decode_fused(decode_qmm) -> str:
  """Batch-1 decode through the kernel with each layer's projections fused into one launch per
  input (and unfused), vs bf16, one run."""
  rows = {r['variant']: r for r in load_json(decode_qmm)['rows'] if r.get('tokens_per_s')}
  bf16 = rows['bf16']
  parts = []
  for kind, target in (('int8', 1.6), ('int4', 2.5)):
    fused = rows[f'{kind}:triton']['tokens_per_s'] / bf16['tokens_per_s']
    unfused = rows[f'{kind}:triton:unfused']['tokens_per_s'] / bf16['tokens_per_s']
    parts.append(f"{kind} {fused:.2f}x bf16 tokens/s fused, {unfused:.2f}x unfused (target "
                 f"{target}x {'met' if fused >= target else 'missed'})")
  return '; '.join(parts) + f" (bf16 {bf16['ms_per_step']:.3f} ms a token)"


def quantized_decode_gemv(decode_qmm) -> str:
  """Batch-1 decode through the one-row GEMV kernels and through the dot kernels, vs bf16."""
  rows = {r['variant']: r for r in load_json(decode_qmm)['rows'] if r.get('tokens_per_s')}
  bf16 = rows['bf16']['tokens_per_s']
  parts = []
  for kind, target in (('int8', 1.6), ('int4', 2.5)):
    gemv = rows[f'{kind}:triton:gemv']['tokens_per_s'] / bf16
    # The 2026-12-06 file predates the ':dot' variant: its plain ':triton' ran the dot kernels
    # (compress.qmm_gemv was off then).
    dot = (rows.get(f'{kind}:triton:dot') or rows[f'{kind}:triton'])['tokens_per_s'] / bf16
    parts.append(f"{kind} {gemv:.2f}x bf16 tokens/s through the GEMV kernels, {dot:.2f}x through "
                 f"the dot kernels (target {target}x {'met' if max(gemv, dot) >= target else 'missed'})")
  return '; '.join(parts)


def quantized_decode_output_major(*decode_qmm) -> str:
  """Batch-1 decode with the quantized weights stored output-major (one-row kernels with no
  split-K) against the [K, N] GEMV kernels, vs bf16 of the same run (one file per run, each
  kind from the file that has it)."""
  parts = []
  for kind, target in (('int8', 1.6), ('int4', 2.5)):
    rows = next(rows for rows in ({r['variant']: r for r in load_json(path)['rows']
                                   if r.get('tokens_per_s')} for path in decode_qmm)
                if f'{kind}:triton:nk' in rows)
    bf16 = rows['bf16']['tokens_per_s']
    nk = rows[f'{kind}:triton:nk']['tokens_per_s'] / bf16
    gemv = rows[f'{kind}:triton:gemv']['tokens_per_s'] / bf16
    parts.append(f"{kind} {nk:.2f}x bf16 tokens/s output-major, {gemv:.2f}x through the [K, N] "
                 f"GEMV kernels (target {target}x {'met' if max(nk, gemv) >= target else 'missed'})")
  return '; '.join(parts)


def quantized_decode_batched(decode_qmm) -> str:
  """Batched decode with output-major quantized weights (XLA above one row) against the [K, N]
  kernels (int4 GEMV variant, int8 dot variant), vs bf16 of the same run."""
  rows = {r['variant']: r for r in load_json(decode_qmm)['rows'] if r.get('tokens_per_s')}
  bf16 = rows['bf16']['tokens_per_s']
  parts = []
  for kind, other, what in (('int4', 'int4:triton:gemv', 'GEMV'), ('int8', 'int8:triton', 'dot')):
    parts.append(f"{kind} {rows[f'{kind}:triton:nk']['tokens_per_s'] / bf16:.2f}x bf16 "
                 f"tokens/s output-major, {rows[other]['tokens_per_s'] / bf16:.2f}x through the "
                 f"[K, N] {what} kernels")
  return '; '.join(parts)


def output_major_widening(*tune_runs) -> str:
  """tune_decode.py --nk runs: per kind, each setting's speed vs the bf16 step of its own run
  (BN:BK with the bytes widening, BN:BK:words with 32-bit words); settings in every run give
  their range over the runs."""
  ratios: dict[tuple[str, str], list[float]] = {}
  for path in tune_runs:
    rows = load_json(path)['rows']
    bf16 = next(r['ms_per_step'] for r in rows if r['kind'] == 'bf16')
    for r in rows:
      if r['kind'] != 'bf16' and r.get('ms_per_step'):
        ratios.setdefault((r['kind'], r['setting']), []).append(bf16 / r['ms_per_step'])
  parts = []
  for kind, target in (('int4', 2.5), ('int8', 1.6)):
    mine = {setting: v for (k, setting), v in ratios.items() if k == kind}
    if not mine:
      continue
    text = ', '.join(f"{setting} {min(v):.2f}" + (
        f"-{max(v):.2f}x" if f'{min(v):.2f}' != f'{max(v):.2f}' else 'x') for setting, v in mine.items())
    best = max(max(v) for v in mine.values())
    parts.append(f"{kind} vs bf16: {text} (target {target}x {'met' if best >= target else 'missed'})")
  return '; '.join(parts)


def decode_levers(baseline, *others) -> str:
  """The batch-1 decode step with more weights stored output-major, or the loop as one CUDA
  graph, against the default (wo output-major) of the same run."""
  base = bench_row(baseline, context=1024)
  parts = [f"default {base['ms_per_token']:.3f} ms/token"]
  for path in others:
    r = bench_row(path, context=1024)
    label = ('whole loop as a CUDA graph' if path.stem == 'levers_graph_while' else
             path.stem.replace('levers_major_', 'output-major ').replace('_w', ',w'))
    parts.append(f"{label} "
                 f"{base['ms_per_token'] / r['ms_per_token']:.3f}x")
  fraction = max(bench_row(p, context=1024)['roofline_fraction'] for p in (baseline, *others))
  return '; '.join(parts) + (f' (best {fraction:.0%} of the measured-copy roofline: target 70% '
                             f"{'met' if fraction >= 0.7 else 'missed'})")


def attention_d64(bench) -> str:
  """The Hopper kernels against cuDNN at head dim 64, causal, S >= 4k (target 1.0x)."""
  rows = [r for r in ok_rows(bench_rows(bench)) if r['op'] == 'attention' and r.get('ms')]
  ms = {(r['group'], r['variant'], r['mode'], r['impl']): r['ms'] for r in rows}
  mine = [r for r in rows if r['impl'] == 'effjax_mosaic_gpu' and r['variant'] == 'dense'
          and r['seq_len'] >= 4096 and r['head_dim'] == 64]
  parts = [f"{span([ms[(r['group'], 'dense', mode, 'cudnn')] / r['ms'] for r in mine if r['mode'] == mode])}"
           f" cuDNN {mode}" for mode in ('fwd', 'fwd+bwd')]
  return 'D64: ' + ', '.join(parts) + ' (target 1.0x); ' + mosaic_attention(
      bench, restricted_dim=64).split('; ', 2)[2].replace('at 16k, D64, ', 'at 16k, ')


_SWEEP_ROW = re.compile(r'^B\d+ S(\d+) H\d+ D(\d+) (?:cudnn|block_k\s+(\d+) stages (\d+)'
                        r'( \(default\))?( scale not folded)?): ([\d.]+) ms')


def forward_sweep(*sweeps, tilings: dict[int, tuple[int, int]]) -> str:
  """The Mosaic GPU forward sweep (fwd_sweep.py output) against cuDNN per head dim, over the
  swept lengths: the tiling `tilings` names for the head dim (block_k, stages), against the
  sweep's 'scale not folded' row (the default tiling before the fold)."""
  cudnn, chosen, unfolded = {}, {}, {}
  for path in sweeps:
    for line in path.read_text().splitlines():
      m = _SWEEP_ROW.match(line)
      if not m:
        continue
      seq, dim, block_k, stages, _, not_folded, ms = m.groups()
      key = (int(dim), int(seq))
      if block_k is None:
        cudnn[key] = float(ms)
      elif not_folded:
        unfolded[key] = float(ms)
      elif (int(block_k), int(stages)) == tilings.get(int(dim)):
        chosen[key] = float(ms)
  parts = []
  for dim in sorted({d for d, _ in cudnn}):
    keys = sorted(k for k in cudnn if k[0] == dim)
    ratios = lambda table: span([cudnn[k] / table[k] for k in keys if k in table])
    block_k, stages = tilings[dim]
    parts.append(f"D{dim} at S {', '.join(seq_text(s) for _, s in keys)}: {block_k}-key tiles, "
                 f"{stages} slots {ratios(chosen)} cuDNN fwd (before the fold, 128-key tiles: "
                 f"{ratios(unfolded)})")
  return ('; '.join(parts) + ' (targets: D64 1.0x, D128 1.1x cuDNN, fwd and fwd+bwd in the '
          'benchmark, which has not run on this code)')


def attention_kernels(bench) -> str:
  """Flash attention against cuDNN (causal, S >= 4k), and window / sparse against dense."""
  rows = [r for r in ok_rows(bench_rows(bench))
          if r['op'] == 'attention' and r['impl'] == 'effjax' and r['causal']]
  dense = [r for r in rows if r['variant'] == 'dense' and r['seq_len'] >= 4096]
  window = [r for r in rows if r.get('window') and r['mode'] == 'fwd+bwd']
  sparse = [r for r in rows if r.get('layout') and r['mode'] == 'fwd+bwd']
  pct = statistics.fmean(r['block_sparsity_pct'] for r in sparse)
  return (f"{span([r['speedup_vs_baseline'] for r in dense if r['mode'] == 'fwd+bwd'])} cuDNN "
          f"fwd+bwd, {span([r['speedup_vs_baseline'] for r in dense if r['mode'] == 'fwd'])} fwd; "
          f"sliding window {window[0]['window']} at {seq_text(window[0]['seq_len'])}: "
          f"{span([r['speedup_vs_dense'] for r in window], 1)} faster than the same kernel's "
          f"dense; {pct:.0f}% block-sparse: {span([r['speedup_vs_dense'] for r in sparse], 1)}")


def mosaic_attention(bench, restricted_dim: int | None = None) -> str:
  """The Hopper kernels against cuDNN and tokamax (causal, S >= 4k) and window / sparse vs dense
  (the first such rows of the file, or those at head dim restricted_dim)."""
  # Timed attention rows only (a file may also hold the check rows and the matmul peak).
  rows = [r for r in ok_rows(bench_rows(bench)) if r['op'] == 'attention' and r.get('ms')]
  ms = {(r['group'], r['variant'], r['mode'], r['impl']): r['ms'] for r in rows}
  mine = [r for r in rows if r['impl'] == 'effjax_mosaic_gpu']
  dense = [r for r in mine if r['variant'] == 'dense' and r['seq_len'] >= 4096
           and r['head_dim'] == 128]

  def vs(impl, mode):
    return span([ms[(r['group'], 'dense', mode, impl)] / r['ms'] for r in dense
                 if r['mode'] == mode])

  def restricted(prefix):
    r = next(r for r in mine if r['variant'].startswith(prefix) and r['mode'] == 'fwd+bwd'
             and restricted_dim in (None, r['head_dim']))
    return ms[(r['group'], 'dense', 'fwd+bwd', 'effjax_mosaic_gpu')] / r['ms']

  at = f'at 16k, D{restricted_dim}' if restricted_dim else 'at 16k'
  return (f"D128: {vs('cudnn', 'fwd')} cuDNN fwd, {vs('cudnn', 'fwd+bwd')} fwd+bwd; "
          f"{vs('tokamax', 'fwd')} tokamax fwd, {vs('tokamax', 'fwd+bwd')} fwd+bwd; {at}, "
          f"window 1024 {restricted('window'):.2f}x and ~90% block-sparse "
          f"{restricted('bigbird'):.2f}x faster than its dense fwd+bwd")


def gpt2_flash(cudnn, flash) -> str:
  """GPT-2-small training tokens/s with flash layers on each backend vs cuDNN attention layers."""
  base = bench_rows(cudnn)[0]['tokens_per_second']
  # A sweep names each row by its backend; a single run's backend is in its command.
  single = re.search(r'attention_backend=(\w+)', load_json(flash)['environment']['command'])
  ratios = {(r['name'].split('=')[-1] if '=' in r['name'] else single.group(1)):
            r['tokens_per_second'] / base for r in ok_rows(bench_rows(flash))}
  parts = [f'{backend} {ratio:.3f}x' for backend, ratio in ratios.items()]
  verdict = 'met' if max(ratios.values()) >= 1.0 else 'missed'
  return (f"flash layers vs cuDNN attention layers ({base:,.0f} tokens/s): {', '.join(parts)} "
          f"(target >= 1.0x {verdict})")


def lora_memory_chunked(full, lora) -> str:
  """Both sides rematerialised, bf16 LoRA base, the loss over 64-position chunks, batch 16."""
  f, r = bench_rows(full)[0], bench_rows(lora)[0]
  fraction = r['peak_memory_gb'] / f['peak_memory_gb']
  verdict = 'met' if fraction <= LORA_MEMORY_TARGET else 'missed'
  return (f"{fraction:.1%} at batch {f['batch_size']} ({r['peak_memory_gb']:.1f} vs "
          f"{f['peak_memory_gb']:.1f} GB; target {LORA_MEMORY_TARGET:.0%} {verdict})")


LORA_VARIANT_NAMES = {'bf16_base': 'bf16 base', 'bf16_vocab_bf16': 'bf16 base and vocabulary',
                      'int8_base': 'int8 base', 'int4_base': 'int4 base'}


def lora_memory_variants(full, *loras) -> str:
  """LoRA variants (batch 16, remat, 64-position loss chunks) against full fine-tuning, all
  measured in one run."""
  f = bench_rows(full)[0]
  parts = []
  for path in loras:
    r = bench_rows(path)[0]
    fraction = r['peak_memory_gb'] / f['peak_memory_gb']
    name = LORA_VARIANT_NAMES[pathlib.Path(path).stem.removeprefix('finetune_memory_lora_')
                              .removesuffix('_remat_chunk64')]
    parts.append(f"{name} {fraction:.1%} ({r['peak_memory_gb']:.1f} GB, "
                 f"{'met' if fraction <= LORA_MEMORY_TARGET else 'missed'})")
  return (f"of full fine-tuning's {f['peak_memory_gb']:.1f} GB at batch {f['batch_size']}: "
          + '; '.join(parts) + f' (target {LORA_MEMORY_TARGET:.0%})')


def compression_distill(table) -> str:
  """The distilled student against its own source (a table of two rows)."""
  rows = load_json(table)['rows']
  source, student = rows[0], rows[-1]
  return (f"student {student['bytes'] / source['bytes']:.2f}x the bytes, decode "
          f"{student['decode_tokens_per_s'] / source['decode_tokens_per_s']:.2f}x, held-out loss "
          f"{student['loss']:.4f} vs the source's {source['loss']:.4f} "
          f"({student['loss'] / source['loss'] - 1:+.1%}) after {student['finetune_steps']} steps")


def decode_output_major(b1_major, b1_training, b16_major, b16_training) -> str:
  """The decode step with wo stored output-major vs the training layout, same run."""
  one, one_t = bench_row(b1_major, context=1024), bench_row(b1_training, context=1024)
  parts = [f"batch 1, 1k: {one['ms_per_token']:.3f} vs {one_t['ms_per_token']:.3f} ms/token "
           f"({one_t['ms_per_token'] / one['ms_per_token']:.2f}x), "
           f"{one['roofline_fraction']:.0%} of the measured-copy roofline (target 70% "
           f"{'met' if one['roofline_fraction'] >= 0.7 else 'missed'})"]
  for context in (1024, 8192):
    m, t = bench_row(b16_major, context=context), bench_row(b16_training, context=context)
    parts.append(f"batch 16, {seq_text(context)}: {t['ms_per_token'] / m['ms_per_token']:.2f}x")
  return '; '.join(parts)


def decode_cache_write(*files) -> str:
  """The decode step without and with the cache written by the attention kernel: files in
  (without, with) pairs, each pair from one run; per batch and context the range of the pairs'
  speedups, and the best batch-1 1k row's roofline fraction (its own copy measurement, and the
  fastest copy measured: in these runs, or, given an odd file last, that earlier run's too)."""
  pairs, earlier = (files[:-1], files[-1:]) if len(files) % 2 else (files, ())
  speedups: dict[tuple[int, int], list[float]] = {}
  best = None
  for off, on in zip(pairs[0::2], pairs[1::2]):
    for r_on in bench_rows(on):
      r_off = bench_row(off, context=r_on['context'])
      key = (r_on['batch'], r_on['context'])
      speedups.setdefault(key, []).append(r_off['ms_per_token'] / r_on['ms_per_token'])
      if key == (1, 1024) and (best is None or r_on['ms_per_token'] < best['ms_per_token']):
        best = r_on
  parts = [f"batch {b}, {seq_text(c)}: {min(v):.3f}-{max(v):.3f}x" if len(v) > 1 else
           f"batch {b}, {seq_text(c)}: {v[0]:.3f}x" for (b, c), v in sorted(speedups.items())]
  copies = [r['bandwidth_gbs'] for path in pairs for r in bench_rows(path)]
  fastest = max(copies + [bench_row(path, context=1024)['bandwidth_gbs'] for path in earlier])
  at = lambda gbs: best['mb_per_token'] * 2**20 / (gbs * 1e9) / (best['ms_per_token'] * 1e-3)
  margin, spread = at(fastest) - 0.7, at(min(copies)) - at(max(copies))
  verdict = 'met' if margin >= 0 else 'missed'
  where = 'in these runs' if fastest == max(copies) else 'on any H100 here (an earlier run\'s)'
  text = (f"best batch-1 1k step {best['ms_per_token']:.3f} ms/token: "
          f"{best['roofline_fraction']:.0%} of its own row's copy roofline, {at(fastest):.1%} of "
          f"the fastest copy {where} ({fastest / 1e3:.2f} TB/s; these runs' copies ranged "
          f"{min(copies) / 1e3:.2f}-{max(copies) / 1e3:.2f}; target 70% {verdict} on the latter")
  if margin >= 0:
    text += (', by a margin smaller than the copies\' spread' if margin < spread else
             ', by more than the copies\' spread')
  return ', '.join(parts) + '; ' + text + ')'


def decode_b1_contexts(new, earlier) -> str:
  """Batch 1 at 1k and 8k with the output-major default; the roofline fraction also against the
  faster of the two runs' copy bandwidths, since that measurement moves between machines
  (the verdict uses the latter)."""
  bandwidth = max(bench_row(path, context=1024)['bandwidth_gbs'] for path in (new, earlier))
  parts, fractions = [], {}
  for context in (1024, 8192):
    r = bench_row(new, context=context)
    fractions[context] = (r['mb_per_token'] * 2**20 / (bandwidth * 1e9) /
                          (r['ms_per_token'] * 1e-3))
    parts.append(f"{seq_text(context)}: {r['ms_per_token']:.3f} ms/token, "
                 f"{r['roofline_fraction']:.1%} of this run's copy roofline, "
                 f"{fractions[context]:.1%} of the faster copy's ({bandwidth / 1e3:.2f} TB/s)")
  verdict = 'met' if fractions[1024] >= 0.7 else 'missed'
  return '; '.join(parts) + f' (1k target 70% {verdict})'


# ---------------------------------------------------------------------------------------------
# The rows, in README order.


@dataclasses.dataclass(frozen=True)
class Row:
  """One table row: fixed 'what' and 'machine' text, the files behind 'result'."""
  what: str
  machine: str
  experiment: str
  files: tuple[str, ...]
  result: Callable[..., str]

  def paths(self, root: pathlib.Path) -> list[pathlib.Path]:
    return [root / f for f in self.files]

  def render(self, root: pathlib.Path) -> str:
    where = f'[experiments/{self.experiment}](experiments/{self.experiment}/README.md)'
    return f'| {self.what} | {self.machine} | {self.result(*self.paths(root))} | {where} |'


TP = 'experiments/throughput/results'
MOE_H200 = 'experiments/moe/results/h200_2026_12_02'
MOE_LATEST = 'experiments/moe/results/h200_2026_12_04_fused_gate_up'
DA = 'experiments/decode_attention/results/h200_2026_12_04'
DA_H100 = 'experiments/decode_attention/results/h100_2026_12_06'
AK_H100 = 'experiments/attention_kernels/results/h100_2026_12_06_speed'
AK_TRAIN = 'experiments/attention_kernels/results/h100_2026_12_06_train'
CR = 'experiments/compression/results'

AK_TARGETS = 'experiments/attention_kernels/results/h100_2026_12_06_targets'
AK_SWEEP = 'experiments/attention_kernels/results/h100_2026_12_07_fwd_sweep'
AK_H200 = 'experiments/attention_kernels/results/h200_2026_12_07'
QM_H200 = 'experiments/quantized_matmul/results/h200_2026_12_07_nk3d'
QM_WORDS = 'experiments/quantized_matmul/results/h100_2026_12_07_words'
QM_XPREP = 'experiments/quantized_matmul/results/h100_2026_12_07_xprep'
KW = 'experiments/decode_attention/results/h100_2026_12_07_kernel_levers'
KWR = 'experiments/decode_attention/results/h100_2026_12_08_kw_rotary'
LEVERS = 'experiments/decode_attention/results/h100_2026_12_06_levers'

ROWS = (
    Row('default quickstart, 3.05M params, 240 steps', '2 CPU cores', 'cpu_default',
        ('experiments/cpu_default/metrics.jsonl', 'configs/base.py'), cpu_default),
    Row('GPT-2-small shape, bf16, batch 128 x 1024', '1 x H200', 'throughput',
        (f'{TP}/round6/gpt2_b128.json', f'{TP}/round6/gpt2_torch_peer_b128.json'), gpt2_tuned),
    Row('1.03B model, seq 2048, batch 32', '1 x H200', 'throughput',
        (f'{TP}/round4/gpt1b_final.json',), gpt1b),
    Row('same, data parallel / FSDP', '2 x H200', 'throughput',
        (f'{TP}/round5/gpt1b_1gpu.json', f'{TP}/round5/gpt1b_dp2.json',
         f'{TP}/round5/gpt1b_fsdp2.json'), two_gpu_scaling),
    Row('largest model on 80 GB, full remat, no FSDP', '1 x H200 capped at 80 GB', 'throughput',
        (f'{TP}/round4/memory_80gb.json', f'{TP}/round5/memory_80gb_edge.json'), largest_on_80gb),
    Row('GPT-2-small shape, the first untuned version', '1 x H200', 'gpu_smoke',
        ('experiments/gpu_smoke/gpt2_metrics.jsonl',), gpt2_untuned),
    Row('Sophia-G / -H vs a tuned AdamW, 117M model, 33M tokens', '1 x H100', 'sophia_vs_adamw',
        ('experiments/sophia_vs_adamw/results.json',), sophia),
    Row('chunked scan (GLA / SSD shapes, Pallas Triton) vs cuDNN causal attention, fwd+bwd',
        '1 x H200', 'mixers', ('experiments/mixers/results/kernels_scan.json',), scan_kernel),
    Row('decoding tokens/s, context 1k to 32k, 26M models', '2 CPU cores', 'mixers',
        tuple(f'experiments/mixers/results/decode_cpu_{m}.json'
              for m in ('gla', 'mamba2', 'attention')), decode),
    Row('GLA, Mamba-2, hybrid vs softmax attention, 26-29M params, 0.82M tokens', '2 CPU cores',
        'mixers', ('experiments/mixers/results.json', 'experiments/mixers/results.md'),
        mixers_quality),
    Row('MoE vs dense at equal active FLOPs, 3M-active models, 2M tokens', '2 CPU cores', 'moe',
        ('experiments/moe/results.json',), moe_quality),
    Row('MoE grouped matmul (Pallas Triton), 16k rows, bf16, vs the same FLOPs as a dense einsum',
        '1 x H200', 'moe',
        (f'{MOE_H200}/kernels_gmm.json', f'{MOE_H200}/gmm_tokamax_console.log',
         f'{MOE_LATEST}/kernels_gmm_experts64.json'), grouped_matmul),
    Row('MoE 8x top-2 training step vs its dense twin (equal active FLOPs), 12 layers, '
        'width 1024', '1 x H200', 'moe',
        (f'{MOE_LATEST}/moe_vs_dense.json',
         f'{MOE_H200}/moe_vs_dense.json', f'{MOE_H200}/moe_ragged_dot.json'), moe_step),
    Row('every config through `effjax.main` (train, eval, checkpoint, resume, sample)',
        '1 x H200', 'gpu_smoke',
        ('experiments/gpu_smoke/smoke_h200_run4.json',
         'experiments/gpu_smoke/smoke_h200_run5.json',
         'experiments/gpu_smoke/smoke_h200_run6.json',
         'experiments/gpu_smoke/smoke_h200_run7.json', 'configs/sharded_cpu.py'), gpu_smoke),
    Row('the ten configs whose code changed since, through `effjax.main`', '1 x H100',
        'gpu_smoke', ('experiments/gpu_smoke/smoke_h100_run8.json', 'configs/sharded_cpu.py'),
        gpu_smoke),
    Row('int8 / int4 weight-only quantization (PTQ) of the 1.03B model, decode at batch 1',
        '1 x H200', 'compression', ('experiments/compression/results/h200_gpt_1b.json',),
        compression_decode),
    Row('the same on a retrained source, decoding through the quantized-matmul kernel (bf16 with '
        "attention's out projection stored output-major)", '1 x H100',
        'compression', (f'{CR}/h100_gpt_1b.json',), compression_decode),
    Row('2:4 and magnitude pruning, 100 fine-tuning steps, vs the dense model fine-tuned the same '
        'steps, 1.03B model', '1 x H100', 'compression', (f'{CR}/h100_gpt_1b.json',),
        compression_pruning),
    Row('the same decode through the weight-only quantized-matmul kernel (Pallas Triton), '
        'random weights', '1 x H200', 'quantized_matmul',
        ('experiments/quantized_matmul/results/h200_2026_12_04/decode_qmm_tuned.json',
         f'{DA}/decode_qmm.json'), quantized_decode),
    Row('the same, projections of a layer fused into one kernel launch per input, vs unfused',
        '1 x H100', 'quantized_matmul',
        ('experiments/quantized_matmul/results/h100_2026_12_06/decode_qmm.json',),
        quantized_decode_fused),
    Row('the same, one-row GEMV kernels (no tensor cores) vs the dot kernels', '1 x H100',
        'quantized_matmul',
        ('experiments/quantized_matmul/results/h100_2026_12_06_gemv/decode_gemv.json',),
        quantized_decode_gemv),
    Row('the same, weights stored output-major for decoding (one-row kernels, no split-K sums) '
        'vs the [K, N] GEMV kernels', '1 x H100', 'quantized_matmul',
        ('experiments/quantized_matmul/results/h100_2026_12_07_nk/decode_qmm.json',),
        quantized_decode_output_major),
    Row('the same at batch 16 (more rows multiply the transposed weights through XLA; the '
        'same run at batch 1: int4 1.32x, int8 1.10x)', '1 x H100', 'quantized_matmul',
        (f'{QM_XPREP}/decode_nk_b16/decode_qmm.json',), quantized_decode_batched),
    Row('the same on one H200 after the output-major int4 kernel took whole-group tiles (row '
        'tile 8; each kind with bf16 in its own call)', '1 x H200', 'quantized_matmul',
        (f'{QM_H200}/decode_qmm_int8.json', f'{QM_H200}/decode_qmm_int4.json'),
        quantized_decode_output_major),
    Row('the output-major kernels reading their weights as 32-bit words (values masked in place) '
        'vs bytes, on the decode step (BN:BK = row tile : K step, bytes then; :words = words), two '
        'runs', '1 x H100',
        'quantized_matmul',
        (f'{QM_WORDS}/tune_decode_nk_run1.json', f'{QM_WORDS}/tune_decode_nk_run2.json'),
        output_major_widening),
    Row('LoRA (r=8, base frozen) vs full fine-tuning peak memory, 1.03B model, seq 2048',
        '1 x H200', 'compression', tuple(f'experiments/compression/results/finetune_memory_{v}.json'
                                         for v in ('full', 'lora', 'full_remat',
                                                   'lora_bf16_base_remat')),
        lora_memory),
    Row('the same with the loss over 64-position chunks, both sides rematerialised, bf16 base',
        '1 x H100', 'compression',
        (f'{CR}/finetune_memory_full_remat_chunk64.json',
         f'{CR}/finetune_memory_lora_bf16_base_remat_chunk64.json'), lora_memory_chunked),
    Row('LoRA variants on the same settings, one run: bf16 base, bf16 base and frozen '
        'embedding / head in bf16, int8 and int4 weight-only base (QLoRA-style)', '1 x H100',
        'compression', tuple(f'{CR}/finetune_memory_{v}_remat_chunk64.json' for v in (
            'full', 'lora_bf16_base', 'lora_bf16_vocab_bf16', 'lora_int8_base', 'lora_int4_base')),
        lora_memory_variants),
    Row('distilled student (8 of 16 layers, 100 steps, teacher forward in the step) of a '
        'retrained 1.03B source', '1 x H100', 'compression', (f'{CR}/h100_gpt_1b_distill.json',),
        compression_distill),
    Row('1.03B model, batch-1 decode step with the decode-attention kernel (Pallas Triton) vs '
        "XLA's attention, random weights", '1 x H200', 'decode_attention',
        (f'{DA}/decode_gpt_1b_b1_kernel.json', f'{DA}/decode_gpt_1b_b1_xla.json'),
        decode_attention_step),
    Row('the same decode step with attention\'s out projection stored output-major for decoding '
        '(`infer.output_major`) vs the training layout', '1 x H100', 'decode_attention',
        tuple(f'{DA_H100}/decode_gpt_1b_b{b}_output_major_{m}.json'
              for b in (1, 16) for m in ('wo', 'none')), decode_output_major),
    Row('the same output-major decode step at batch 1 over 1k and 8k contexts, a later fresh '
        'machine', '1 x H100', 'decode_attention',
        (f'{DA_H100}/decode_gpt_1b_b1_output_major_wo_1k_8k.json',
         f'{DA_H100}/decode_gpt_1b_b1_output_major_wo.json'), decode_b1_contexts),
    Row('the batch-1 output-major decode step with more weights output-major, and with the '
        'whole loop as one CUDA graph', '1 x H100', 'decode_attention',
        tuple(f'{LEVERS}/levers_{v}.json' for v in (
            'major_wo', 'major_wo_w_gate_w_up', 'major_wo_w_gate_w_up_w_down',
            'major_wo_wq_wk_wv_w_gate_w_up_w_down', 'graph_while')), decode_levers),
    Row('the batch-1 and batch-16 decode step with the attention kernel writing the new keys '
        'and values into the cache itself (infer.cache_write_in_kernel) vs two cache-write '
        'kernels a layer, speedup in two paired runs each', '1 x H100', 'decode_attention',
        (f'{KW}/kw_b1_False_a.json', f'{KW}/kw_b1_True_a.json',
         f'{KW}/kw_b1_False_b.json', f'{KW}/kw_b1_True_b.json',
         f'{KW}/levers2_b16_kw_False.json', f'{KW}/levers2_b16_kw_True.json',
         f'{KW}/kw_b16_False.json', f'{KW}/kw_b16_True.json'), decode_cache_write),
    Row('the same with the kernel also rotating q and the new keys (infer.cache_write_in_kernel, '
        'now on by default) vs two cache writes, the rotary and the query padding kernels, two '
        'paired runs at batch 1, one at 16', '1 x H100', 'decode_attention',
        (f'{KWR}/kwr_b1_off.json', f'{KWR}/kwr_b1_kw.json', f'{KWR}/kwr_b1_off_again.json',
         f'{KWR}/kwr_b1_kw_again.json', f'{KWR}/kwr_b16_False.json', f'{KWR}/kwr_b16_True.json',
         f'{DA_H100}/decode_gpt_1b_b1_output_major_wo.json'), decode_cache_write),
    Row('1.03B model with exits after layers 4 and 8 and a 0.15B draft, trained on the byte '
        'corpus; batch-1 greedy decoding of code prompts', '1 x H200', 'early_exit',
        ('experiments/early_exit/results_gpu/gpu_gpt_1b.json',), speculative_study),
    Row('the same study after the decoder cut the head to the tokenizer\'s rows', '1 x H100',
        'early_exit', ('experiments/early_exit/results_gpu/gpu_gpt_1b_h100_thresholds.json',
                       'experiments/early_exit/results_gpu/gpu_gpt_1b_h100_spec.json'),
        speculative_study),
    Row('the same study retrained, decoding in float32 (bf16 training): is the speculative '
        'output plain greedy\'s?', '1 x H100', 'early_exit',
        ('experiments/early_exit/results_gpu/gpu_gpt_1b_h100_spec_f32decode.json',),
        speculative_decode_set),
    Row('flash attention (Pallas Triton) vs cuDNN, causal, S 4k-16k', '1 x H100',
        'attention_kernels', ('experiments/attention_kernels/results/round2_final.json',),
        attention_kernels),
    Row('flash attention (Pallas Mosaic GPU: TMA, wgmma, warp-specialised) vs cuDNN and tokamax, '
        'causal, S 4k-16k', '1 x H100', 'attention_kernels',
        ('experiments/attention_kernels/results/h100_2026_12_05_mosaic_gpu/targets.json',),
        mosaic_attention),
    Row('the same after the segment-id fix and the D256 backward, quick grid (causal D128 at 4k '
        'and 16k, window and BigBird at 16k)', '1 x H100', 'attention_kernels',
        (f'{AK_H100}/attention_quick.json',), mosaic_attention),
    Row('the full targets grid (causal S 1k-32k, D64 and D128; window and BigBird at 16k), a '
        'later run; ratios over S >= 4k', '1 x H100', 'attention_kernels', (f'{AK_TARGETS}/attention_targets.json',),
        functools.partial(mosaic_attention, restricted_dim=128)),
    Row('the same run at head dim 64', '1 x H100', 'attention_kernels',
        (f'{AK_TARGETS}/attention_targets.json',), attention_d64),
    Row('the Mosaic GPU forward alone after the scale fold and head dim 64\'s 256-key tiles, '
        'causal (tile sweep, forward only)', '1 x H100', 'attention_kernels',
        (f'{AK_SWEEP}/fwd_sweep_s4k.txt', f'{AK_SWEEP}/fwd_sweep_s16k.txt'),
        functools.partial(forward_sweep, tilings={64: (256, 3), 128: (128, 2)})),
    Row('GPT-2-small training (bf16, batch 128 x 1024) with `flash` layers vs cuDNN attention '
        'layers', '1 x H100', 'attention_kernels',
        (f'{AK_H100}/gpt2_cudnn.json', f'{AK_H100}/gpt2_flash.json'), gpt2_flash),
    Row('the same again, a later run', '1 x H100', 'attention_kernels',
        (f'{AK_TRAIN}/gpt2_cudnn.json', f'{AK_TRAIN}/gpt2_flash.json'), gpt2_flash),
    Row('1.03B model training (bf16, batch 16 x 2048) with `flash` layers vs cuDNN attention '
        'layers', '1 x H100', 'attention_kernels',
        (f'{AK_TRAIN}/gpt1b_cudnn.json', f'{AK_TRAIN}/gpt1b_flash.json'), gpt2_flash),
    Row('GPT-2-small training with `flash` layers on Mosaic GPU vs cuDNN attention layers, after '
        "the D64 forward's 256-key tiles", '1 x H200', 'attention_kernels',
        (f'{AK_H200}/gpt2_cudnn.json', f'{AK_H200}/gpt2_flash.json'), gpt2_flash),
)


# ---------------------------------------------------------------------------------------------
# Rendering, checking, writing.


def missing_files(root: pathlib.Path = ROOT, rows: Sequence[Row] = ROWS) -> list[str]:
  """'path (row: what)' for every referenced file that does not exist."""
  return [f'{f} (row: {r.what})' for r in rows for f, p in zip(r.files, r.paths(root))
          if not p.is_file()]


def table_lines(root: pathlib.Path = ROOT, rows: Sequence[Row] = ROWS) -> list[str]:
  """The table: header, then one line per row."""
  return [*HEADER, *(r.render(root) for r in rows)]


def region(root: pathlib.Path = ROOT) -> str:
  """The text between (and including) the markers."""
  return '\n'.join([BEGIN, *table_lines(root), '', FOOTER, END])


def check(readme_text: str, root: pathlib.Path = ROOT, rows: Sequence[Row] = ROWS) -> list[str]:
  """Problems that make README.md's table differ from the files; empty when up to date."""
  missing = missing_files(root, rows)
  if missing:
    return [f'missing file: {m}' for m in missing]
  if BEGIN not in readme_text or END not in readme_text:
    return [f'README.md lacks the markers {BEGIN} / {END}']
  current = readme_text.split(BEGIN, 1)[1].split(END, 1)[0].strip('\n').splitlines()
  problems = []
  by_what = {_cells(line)[0]: line for line in current if _cells(line)}
  for row in rows:
    try:
      want = row.render(root)
    except Exception as e:  # a malformed or changed result file
      problems.append(f'row {row.what}: cannot read its files: {type(e).__name__}: {e}')
      continue
    have = by_what.get(row.what)
    if have is None:
      problems.append(f'missing row: {row.what}')
    elif have != want:
      problems.append(f'stale row: {row.what}\n  README: {have}\n  files:  {want}')
  generated = region(root).splitlines()[1:-1]
  if not problems and current != generated:
    problems.append('the marked region differs from the generated one (row order, extra rows '
                    'or the note under the table)')
  return problems


def replace_region(text: str, new_region: str) -> str:
  """`text` with the marked region (or, the first time, the bare results table) replaced."""
  if BEGIN in text and END in text:
    head, rest = text.split(BEGIN, 1)
    return head + new_region + rest.split(END, 1)[1]
  lines = text.split('\n')
  start = lines.index(HEADER[0])
  stop = start
  while stop < len(lines) and lines[stop].startswith('|'):
    stop += 1
  return '\n'.join(lines[:start] + [new_region] + lines[stop:])


def write(root: pathlib.Path = ROOT) -> None:
  """Regenerates the marked region of README.md, leaving every other line as it is on disk."""
  missing = missing_files(root)
  if missing:
    raise SystemExit('missing file: ' + '; '.join(missing))
  new_region = region(root)  # computed first, so the read-modify-write below is short
  path = root / README
  text = path.read_text()
  path.write_text(replace_region(text, new_region))


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument('--write', action='store_true', help='replace the table in README.md')
  mode.add_argument('--check', action='store_true', help='exit 1 if README.md is stale')
  args = parser.parse_args(argv)
  if args.check:
    problems = check((ROOT / README).read_text())
    for p in problems:
      print(p, file=sys.stderr)
    if problems:
      print('regenerate with: python experiments/results_table.py --write', file=sys.stderr)
      return 1
    print('README.md results table is up to date')
    return 0
  if args.write:
    write()
    print(f'wrote the results table into {README}')
    return 0
  missing = missing_files()
  if missing:
    print('missing file: ' + '; '.join(missing), file=sys.stderr)
    return 1
  print('\n'.join(table_lines()))
  return 0


if __name__ == '__main__':
  sys.exit(main())
