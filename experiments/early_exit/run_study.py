"""The early-exit and speculative-decoding study: train a model with exits (and a draft), sweep
the exit threshold, time every decoding method on real prompts.

    python experiments/early_exit/run_study.py --workdir=/tmp/effjax_early_exit \
        [--config=configs/early_exit.py] [--set section.field=value ...] [--steps=240] \
        [--draft_config=configs/X.py --draft_steps=N] [--name=results] [--out=DIR]
        [--thresholds=1.0,0.9,...|''] [--speculative=self_speculative,speculative|'']
        [--decode_set section.field=value ...] [--decode_precision=highest]

Trains --config (skipped when the workdir already holds its last checkpoint; --set overrides
fields, e.g. model.exit_layers=4,8), then:
  - held out (teacher forced), for each threshold of the softmax-confidence exit rule: the
    perplexity when each token is scored by the first exit whose confidence beats the
    threshold (the full model otherwise), the fraction of those tokens whose greedy choice
    equals the full depth's, and the fraction that exit;
  - free running at batch 1 on PROMPTS (greedy, --new_tokens each), through the decoding
    engine (effjax.infer.generate.Decoder, what --mode=generate runs): tokens/s with
    infer.method=early_exit against plain decoding re-timed in the same round, and the fraction
    of generated tokens equal to full-depth greedy generation position by position;
  - the speculative methods on the same prompts: self_speculative (draft = the first exit) and,
    with --draft_config, speculative with that draft (trained here for --draft_steps into
    <workdir>_draft): tokens/s against plain, acceptance, tokens per round, and whether the
    output is token for token plain greedy's (it must be), and where a prompt's output first
    parts from it, the full model's logit gap between the two tokens there.
--thresholds='' skips the threshold rows and --speculative picks the speculative methods ('' none),
so that a rerun of one row fits in a short GPU command.
Every generation is compiled before it is timed; a prompt's time is the best of --timings runs.
Writes <name>.json, <name>.md and <name>_sweep.png to --out (default: beside this file).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

THRESHOLDS = '1.0,0.99,0.95,0.9,0.8,0.7,0.6,0.5,0.4,0.3,0.0'
# Four prompts of one padded length (16 < bytes + BOS <= 32): one compile per method.
PROMPTS = ('def fibonacci(n):\n', 'import os\nimport sys\n\n', 'class Parser:\n    def ',
           '    for i in range(')


def load_config(path: str, sets):
  from effjax import config as config_lib
  return config_lib.apply_overrides(config_lib.load_file(os.path.join(ROOT, path)), sets)


def study_config(path: str, sets):
  """The config for the study: one device, no periodic evaluation or sampling."""
  config = load_config(path, sets)
  config.mesh.data = 1
  config.train.eval_every = 0
  config.generate.at_end = False
  return config


def train_or_load(config, workdir: str, steps: int):
  """(run, summary) after training to `steps`; a workdir whose last checkpoint is already at
  `steps` is reused as it is (whatever --set said then): use a fresh workdir for new settings."""
  from effjax.train import trainer
  config.train.steps = steps
  os.makedirs(workdir, exist_ok=True)
  run = trainer.build_run(config, workdir)
  if run.checkpointer.latest_step() != steps:
    run.checkpointer.close()
    summary = trainer.train(config, workdir)
    run = trainer.build_run(config, workdir)
  else:
    summary = json.load(open(os.path.join(workdir, 'summary.json'), encoding='utf-8'))
  return run, summary


def first_differences(model, prompts, results, reference, vocab: int) -> list[dict]:
  """Per prompt: where a method's greedy tokens first part from plain decoding's (position None
  if they never do) and, from the full model teacher forced on the shared prefix, the logit gap
  between the two tokens there relative to max |logit|. A gap at the compute dtype's rounding
  level (bf16: a few 2^-8) says a near tie flipped between differently shaped products; a large
  one would point at the acceptance rule."""
  import jax.numpy as jnp
  out = []
  for p, r, ref in zip(prompts, results, reference):
    got, want = list(r.tokens[0]), list(ref.tokens[0])
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if i is None:
      out.append({'position': None, 'equal': got == want})
      continue
    logits = model(jnp.asarray([list(p) + want[:i]], jnp.int32))[0, -1, :vocab]
    logits = np.asarray(logits.astype(jnp.float32))
    out.append({'position': i, 'equal': False, 'plain_token': int(want[i]),
                'method_token': int(got[i]),
                'relative_gap': float(abs(logits[want[i]] - logits[got[i]]) /
                                      max(float(np.abs(logits).max()), 1e-30)),
                'plain_is_argmax': bool(logits.argmax() == want[i])})
  return out


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', default='/tmp/effjax_early_exit')
  parser.add_argument('--config', default='configs/early_exit.py')
  parser.add_argument('--set', action='append', default=[], help='section.field=value')
  parser.add_argument('--out', default=HERE)
  parser.add_argument('--name', default='results')
  parser.add_argument('--steps', type=int, default=240)
  parser.add_argument('--new_tokens', type=int, default=96)
  parser.add_argument('--eval_batches', type=int, default=4)
  parser.add_argument('--thresholds', default=THRESHOLDS)
  parser.add_argument('--draft_config', default='')
  parser.add_argument('--draft_set', action='append', default=[], help='section.field=value')
  parser.add_argument('--draft_steps', type=int, default=0)
  parser.add_argument('--gamma', type=int, default=4)
  parser.add_argument('--speculative', default='self_speculative,speculative',
                      help="the speculative methods timed ('' none; 'speculative' needs "
                      "--draft_config)")
  parser.add_argument('--timings', type=int, default=2)
  parser.add_argument('--decode_set', action='append', default=[], help=(
      'section.field=value applied to the target and the draft after training, for evaluation '
      'and decoding only (e.g. model.compute_dtype=float32: bf16-trained weights decoded in '
      'float32, to tell bf16 near ties from a fault in the speculative rule)'))
  parser.add_argument('--decode_precision', default='', choices=('', 'default', 'high',
                                                                 'highest'), help=(
      "matmul precision for evaluation and decoding only (jax.default_matmul_precision; '' = "
      "the process's): 'highest' decodes float32 weights without TF32 rounding, to check that "
      'speculative output equals plain greedy beyond bf16 / TF32 near ties, while training '
      'runs at its usual speed'))
  args = parser.parse_args()
  if args.draft_config and args.draft_steps < 1:
    parser.error('--draft_config needs --draft_steps >= 1 (the draft is trained here)')
  speculative = [m for m in args.speculative.split(',') if m]
  unknown = sorted(set(speculative) - {'self_speculative', 'speculative'})
  if unknown:
    parser.error(f'--speculative: unknown {unknown}; allowed: self_speculative, speculative')
  if 'speculative' in speculative and not args.draft_config:
    parser.error("--speculative=speculative needs --draft_config (the draft model)")
  try:
    thresholds = [float(t) for t in args.thresholds.split(',') if t.strip()]
  except ValueError:
    parser.error(f'--thresholds={args.thresholds!r}: comma-separated numbers in [0, 1], or ""')
  if any(not 0 <= t <= 1 for t in thresholds):
    parser.error(f'--thresholds={args.thresholds!r}: each must lie in [0, 1]')

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from effjax import data as data_lib
  from effjax.infer import generate as gen
  from effjax.infer.exit_decode import ExitPolicy
  from effjax.infer.sampling import Sampler
  from effjax.models import early_exit
  from effjax.parallel import sharding as shd
  from effjax.train import trainer

  config = study_config(args.config, args.set)
  run, summary = train_or_load(config, args.workdir, args.steps)
  if args.decode_set:  # the trained checkpoint, rebuilt with the decode-time settings
    config = study_config(args.config, args.set + args.decode_set)
    run.checkpointer.close()
    run, _ = train_or_load(config, args.workdir, args.steps)
  draft = None
  if args.draft_config:
    draft_config = study_config(args.draft_config, args.draft_set)
    draft_run, draft_summary = train_or_load(draft_config, args.workdir + '_draft',
                                             args.draft_steps)
    if args.decode_set:
      draft_config = study_config(args.draft_config, args.draft_set + args.decode_set)
      draft_run.checkpointer.close()
      draft_run, _ = train_or_load(draft_config, args.workdir + '_draft', args.draft_steps)
    with jax.set_mesh(draft_run.mesh), shd.axis_rules(draft_run.rules):
      draft_state, _ = trainer._load_latest(draft_run)  # pylint: disable=protected-access
    draft = (draft_run.setup.graphdef, draft_state['params'])
  tok = run.tokenizer
  precision = (jax.default_matmul_precision(args.decode_precision) if args.decode_precision
               else contextlib.nullcontext())
  with jax.set_mesh(run.mesh), shd.axis_rules(run.rules), precision:
    state, step = trainer._load_latest(run)  # pylint: disable=protected-access
    params = state['params']
    graphdef = run.setup.graphdef
    stats_fn = jax.jit(lambda p, t, y: early_exit.exit_statistics(
        nnx.merge(graphdef, p), t, y, 'softmax', tok.vocab_size))
    conf, agree, exit_lp, final_lp = [], [], [], []
    for batch in data_lib.make_eval_batches(config, args.eval_batches):
      out = jax.device_get(stats_fn(params, jnp.asarray(batch['inputs']),
                                    jnp.asarray(batch['targets'])))
      keep = np.asarray(batch['weights']).reshape(-1) > 0
      e = out['confidence'].shape[0]
      conf.append(out['confidence'].reshape(e, -1)[:, keep])
      agree.append(out['agree'].reshape(e, -1)[:, keep])
      exit_lp.append(out['exit_logprob'].reshape(e, -1)[:, keep])
      final_lp.append(out['final_logprob'].reshape(-1)[keep])
    conf, agree = np.concatenate(conf, 1), np.concatenate(agree, 1)
    exit_lp, final_lp = np.concatenate(exit_lp, 1), np.concatenate(final_lp)
    all_lp = np.concatenate([exit_lp, final_lp[None]])
    n_tokens = conf.shape[1]

    prompts = [[tok.bos_id] + list(tok.encode(p)) for p in PROMPTS]
    base = dict(max_new_tokens=args.new_tokens, sampler=Sampler(vocab_limit=tok.vocab_size),
                gamma=args.gamma)

    def timed(decoder):
      """Each prompt's result, its time the best of args.timings runs (compiled first)."""
      results = []
      for p in prompts:
        best = None
        for _ in range(max(args.timings, 1)):
          r = decoder.generate([p])
          if best is None or r.stats['seconds'] < best.stats['seconds']:
            best = r
        results.append(best)
      return results

    def rate(results):
      return (sum(r.stats['new_tokens'] for r in results) /
              sum(r.stats['seconds'] for r in results))

    plain = gen.Decoder(graphdef, params, gen.Options(method='plain', **base))
    reference = timed(plain)
    plain_rate = [rate(reference)]
    rows = []
    for threshold in thresholds:
      chosen = early_exit.first_exit(conf, threshold)
      lp = all_lp[chosen, np.arange(n_tokens)]
      decoder = gen.Decoder(graphdef, params, gen.Options(
          method='early_exit', exit_policy=ExitPolicy(threshold, 'softmax', True), **base))
      results = timed(decoder)
      plain_rate.append(rate(timed(plain)))  # plain re-timed beside each threshold
      same = [np.mean(np.asarray(r.tokens[0][:len(ref.tokens[0])]) ==
                      np.asarray(ref.tokens[0][:len(r.tokens[0])]))
              for r, ref in zip(results, reference)]
      hist = np.sum([r.stats['exit_histogram'] for r in results], axis=0)
      rows.append({
          'threshold': threshold,
          'perplexity': math.exp(-float(np.mean(lp))),
          'nats_per_byte': -float(np.mean(lp)),
          'exit_fraction_heldout': float(np.mean(chosen < conf.shape[0])),
          'agreement_teacher_forced': 1 - early_exit.disagreement(conf, agree, threshold),
          'agreement_generated': float(np.mean(same)),
          'exit_fraction_generated': float(1 - hist[-1] / hist.sum()),
          'tokens_per_s': rate(results),
          'plain_tokens_per_s_same_round': plain_rate[-1],
      })
      print(json.dumps(rows[-1]), flush=True)
    calibrated = {tol: early_exit.calibrate_threshold(conf, agree, tol) for tol in (0.01, 0.05)}

    model = nnx.merge(graphdef, params)

    speculative_rows = []
    methods = [(m, draft if m == 'speculative' else None) for m in speculative]
    for method, draft_model in methods:
      decoder = gen.Decoder(graphdef, params, gen.Options(method=method, **base),
                            draft=draft_model)
      results = timed(decoder)
      again = rate(timed(plain))
      drafted = sum(r.stats['drafted'] for r in results)
      accepted = sum(r.stats['accepted'] for r in results)
      rounds = sum(r.stats['rounds'] for r in results)
      speculative_rows.append({
          'method': method, 'gamma': args.gamma,
          'draft': args.draft_config if draft_model else f'exit after layer {config.model.exit_layers.split(",")[0]}',
          'tokens_per_s': rate(results), 'plain_tokens_per_s_same_round': again,
          'speedup_vs_plain': rate(results) / again,
          'acceptance_rate': accepted / max(drafted, 1),
          'tokens_per_round': sum(r.stats['new_tokens'] for r in results) / max(rounds, 1),
          'equals_plain_greedy': all(r.tokens == ref.tokens for r, ref in zip(results, reference)),
          'first_differences': first_differences(model, prompts, results, reference,
                                                 tok.vocab_size),
      })
      print(json.dumps(speculative_rows[-1]), flush=True)

  full_ppl = math.exp(-float(np.mean(final_lp)))
  for r in rows:
    r['perplexity_increase'] = r['perplexity'] / full_ppl - 1
    r['speedup_vs_plain'] = r['tokens_per_s'] / r['plain_tokens_per_s_same_round']
  device = jax.devices()[0]
  machine = (f'CPU ({os.cpu_count()} cores), {platform.processor() or platform.machine()}'
             if device.platform == 'cpu' else f'1 x {device.device_kind}')
  result = {
      'machine': machine, 'jax': jax.__version__, 'config': args.config, 'set': args.set,
      'decode_set': args.decode_set, 'decode_precision': args.decode_precision or None,
      'steps': args.steps, 'checkpoint_step': step, 'heldout_tokens': n_tokens,
      'full_perplexity': full_ppl, 'final_train': summary.get('train', {}),
      'final_eval': summary.get('eval', {}), 'plain_tokens_per_s': plain_rate,
      'calibrated_thresholds': calibrated, 'rows': rows, 'speculative': speculative_rows,
      'command': 'python experiments/early_exit/run_study.py ' + ' '.join(sys.argv[1:])}
  if draft:
    result.update(draft_config=args.draft_config, draft_set=args.draft_set,
                  draft_steps=args.draft_steps, draft_final_train=draft_summary.get('train', {}))
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f'{args.name}.json'), 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=2, default=float)
  lines = ['| threshold | exited (held-out) | perplexity | vs full | agreement (forced) | '
           'agreement (generated) | exited (generated) | tokens/s | vs plain |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- |'] if rows else []
  for r in rows:
    lines.append(f"| {r['threshold']:.2f} | {r['exit_fraction_heldout']:.1%} | "
                 f"{r['perplexity']:.3f} | {r['perplexity_increase']:+.1%} | "
                 f"{r['agreement_teacher_forced']:.3f} | {r['agreement_generated']:.3f} | "
                 f"{r['exit_fraction_generated']:.1%} | {r['tokens_per_s']:.0f} | "
                 f"{r['speedup_vs_plain']:.2f}x |")
  if speculative_rows:
    lines += ['', '| method | draft | gamma | acceptance | tokens / round | tokens/s | plain '
              'tokens/s | vs plain | output = plain greedy | first difference per prompt '
              '(position: logit gap / max) |',
              '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for r in speculative_rows:
      lines.append(f"| {r['method']} | {r['draft']} | {r['gamma']} | {r['acceptance_rate']:.3f} | "
                   f"{r['tokens_per_round']:.2f} | {r['tokens_per_s']:.0f} | "
                   f"{r['plain_tokens_per_s_same_round']:.0f} | {r['speedup_vs_plain']:.2f}x | "
                   f"{'yes' if r['equals_plain_greedy'] else 'NO'} | "
                   + ', '.join('-' if d['position'] is None and d['equal'] else
                               'shorter' if d['position'] is None else
                               f"{d['position']}: {d['relative_gap']:.1e}"
                               for d in r['first_differences']) + ' |')
  with open(os.path.join(args.out, f'{args.name}.md'), 'w', encoding='utf-8') as f:
    f.write(f"{machine}, {args.config} {' '.join(args.set)}, {args.steps} steps; full-depth "
            f"held-out perplexity {full_ppl:.3f} over {n_tokens} tokens; calibrated thresholds "
            f"{calibrated}.\n\n" + '\n'.join(lines).lstrip('\n') + '\n')
  if not rows:  # --thresholds='': no sweep to plot
    print(open(os.path.join(args.out, f'{args.name}.md'), encoding='utf-8').read())
    return
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  t = [r['threshold'] for r in rows]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  axes[0].plot(t, [r['tokens_per_s'] for r in rows], 'o-', label='early exit')
  axes[0].plot(t, [r['plain_tokens_per_s_same_round'] for r in rows], 'x--', label='plain')
  axes[0].set_ylabel('tokens/s (batch 1)')
  axes[0].legend()
  axes[1].plot(t, [r['perplexity'] for r in rows], 'o-')
  axes[1].axhline(full_ppl, ls='--', c='gray')
  axes[1].set_ylabel('held-out perplexity (bytes)')
  axes[2].plot(t, [r['agreement_teacher_forced'] for r in rows], 'o-', label='teacher forced')
  axes[2].plot(t, [r['agreement_generated'] for r in rows], 's-', label='generated')
  axes[2].set_ylabel('agreement with full depth')
  axes[2].legend()
  for ax in axes:
    ax.set_xlabel('softmax confidence threshold')
    ax.invert_xaxis()
  fig.suptitle(f'Early exit, {machine}: {args.config} (exits after layers '
               f'{config.model.exit_layers}), {args.steps} steps')
  fig.tight_layout()
  stem = 'threshold_sweep' if args.name == 'results' else f'{args.name}_sweep'
  fig.savefig(os.path.join(args.out, f'{stem}.png'), dpi=110)
  print(open(os.path.join(args.out, f'{args.name}.md'), encoding='utf-8').read())


if __name__ == '__main__':
  main()
