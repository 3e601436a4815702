"""The early-exit study: train a model with exits, sweep the confidence threshold, plot it.

    python experiments/early_exit/run_study.py --workdir=/tmp/effjax_early_exit \
        [--out=experiments/early_exit] [--steps=240]

Trains configs/early_exit.py (skipped when the workdir already holds its last checkpoint), then
for each threshold of the softmax-confidence exit rule measures:
  - held-out perplexity with early exit: each held-out token is scored by the distribution of the
    first exit whose confidence beats the threshold (the full model's otherwise), teacher forced;
  - agreement with the full model: the fraction of those tokens whose greedy choice equals the
    full-depth greedy choice (teacher forced), and the fraction of generated tokens equal to
    full-depth greedy generation position by position (free running, batch 1);
  - decoding tokens/s at batch 1 with infer.method=early_exit (the lax.cond path that skips the
    deeper layers' compute), against plain decoding in the same run.
Writes results.json, results.md and threshold_sweep.png beside this file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

THRESHOLDS = (1.0, 0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.0)
PROMPTS = ('def fibonacci(n):\n', 'import os\nimport sys\n\n', 'class Parser:\n    def ',
           '    for i in range(')


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', default='/tmp/effjax_early_exit')
  parser.add_argument('--out', default=HERE)
  parser.add_argument('--steps', type=int, default=240)
  parser.add_argument('--new_tokens', type=int, default=96)
  parser.add_argument('--eval_batches', type=int, default=4)
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from configs import early_exit as study_config
  from effjax import data as data_lib
  from effjax.infer import generate as gen
  from effjax.infer.exit_decode import ExitPolicy
  from effjax.infer.sampling import Sampler
  from effjax.models import early_exit
  from effjax.parallel import sharding as shd
  from effjax.train import trainer

  config = study_config.get_config()
  config.train.steps = args.steps
  config.mesh.data = 1
  os.makedirs(args.workdir, exist_ok=True)
  run = trainer.build_run(config, args.workdir)
  if run.checkpointer.latest_step() != args.steps:
    run.checkpointer.close()
    summary = trainer.train(config, args.workdir)
    run = trainer.build_run(config, args.workdir)
  else:
    summary = json.load(open(os.path.join(args.workdir, 'summary.json'), encoding='utf-8'))
  tok = run.tokenizer
  with jax.set_mesh(run.mesh), shd.axis_rules(run.rules):
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
    base = dict(max_new_tokens=args.new_tokens, sampler=Sampler(vocab_limit=tok.vocab_size))
    plain = gen.Decoder(graphdef, params, gen.Options(method='plain', **base))
    reference = [plain.generate([p]) for p in prompts]
    plain_rate = [sum(r.stats['new_tokens'] for r in reference) /
                  sum(r.stats['seconds'] for r in reference)]
    rows = []
    for threshold in THRESHOLDS:
      chosen = early_exit.first_exit(conf, threshold)
      lp = all_lp[chosen, np.arange(n_tokens)]
      decoder = gen.Decoder(graphdef, params, gen.Options(
          method='early_exit', exit_policy=ExitPolicy(threshold, 'softmax', True), **base))
      results = [decoder.generate([p]) for p in prompts]
      again = [plain.generate([p]) for p in prompts]  # plain re-timed beside each threshold
      plain_rate.append(sum(r.stats['new_tokens'] for r in again) /
                        sum(r.stats['seconds'] for r in again))
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
          'tokens_per_s': sum(r.stats['new_tokens'] for r in results) /
                          sum(r.stats['seconds'] for r in results),
          'plain_tokens_per_s_same_round': plain_rate[-1],
      })
      print(json.dumps(rows[-1]), flush=True)
    calibrated = {tol: early_exit.calibrate_threshold(conf, agree, tol) for tol in (0.01, 0.05)}
  full_ppl = math.exp(-float(np.mean(final_lp)))
  for r in rows:
    r['perplexity_increase'] = r['perplexity'] / full_ppl - 1
    r['speedup_vs_plain'] = r['tokens_per_s'] / r['plain_tokens_per_s_same_round']
  result = {
      'machine': f'CPU ({os.cpu_count()} cores), {platform.processor() or platform.machine()}; '
                 'tiny model: these are CPU numbers, not the GPU targets',
      'jax': jax.__version__, 'config': 'configs/early_exit.py', 'steps': args.steps,
      'checkpoint_step': step, 'heldout_tokens': n_tokens, 'full_perplexity': full_ppl,
      'final_train': summary.get('train', {}), 'final_eval': summary.get('eval', {}),
      'plain_tokens_per_s': plain_rate, 'calibrated_thresholds': calibrated, 'rows': rows,
      'command': 'python experiments/early_exit/run_study.py ' + ' '.join(sys.argv[1:])}
  with open(os.path.join(args.out, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=2, default=float)
  lines = ['| threshold | exited (held-out) | perplexity | vs full | agreement (forced) | '
           'agreement (generated) | exited (generated) | tokens/s | vs plain |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in rows:
    lines.append(f"| {r['threshold']:.2f} | {r['exit_fraction_heldout']:.1%} | "
                 f"{r['perplexity']:.3f} | {r['perplexity_increase']:+.1%} | "
                 f"{r['agreement_teacher_forced']:.3f} | {r['agreement_generated']:.3f} | "
                 f"{r['exit_fraction_generated']:.1%} | {r['tokens_per_s']:.0f} | "
                 f"{r['speedup_vs_plain']:.2f}x |")
  with open(os.path.join(args.out, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(f"CPU, tiny model ({result['machine']}); full-depth held-out perplexity "
            f"{full_ppl:.3f} over {n_tokens} tokens; calibrated thresholds "
            f"{calibrated}.\n\n" + '\n'.join(lines) + '\n')
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
  fig.suptitle('Early exit on CPU, tiny 6-layer model (exits after layers 2 and 4)')
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, 'threshold_sweep.png'), dpi=110)
  print(open(os.path.join(args.out, 'results.md'), encoding='utf-8').read())


if __name__ == '__main__':
  main()
