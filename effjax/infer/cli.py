"""--mode=generate: prompts from the config, a batch decoded with infer.method, texts printed.

    python -m effjax.main --config=configs/default.py --workdir=DIR --mode=generate \
        [--config.generate.prompt='def f(x):' | --config.generate.prompts_file=prompts.txt] \
        [--config.infer.method=plain|early_exit|self_speculative|speculative] \
        [--config.generate.temperature=0 --config.generate.top_p=0.9 --config.generate.seed=1]

Every prompt of the file (one a line, a literal \\n inside a line is a newline) decodes in one
batch. The texts go to stdout (prompt + continuation, a line of dashes between prompts), one
summary line follows (method, tokens, tokens/s, acceptance or exit histogram), and
DIR/generate.jsonl gets one record per prompt. A speculative draft comes from
infer.draft_config (a config file) and infer.draft_workdir (its checkpoint). With
infer.exit_tolerance > 0 the early-exit threshold is calibrated first on held-out batches.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effjax import data as data_lib
from effjax.compress import weights as w_lib
from effjax.infer import generate as gen
from effjax.infer.exit_decode import ExitPolicy
from effjax.infer.sampling import Sampler
from effjax.models import early_exit
from effjax.parallel import sharding as shd


def read_prompts(g) -> list[str]:
  if not g.prompts_file:
    return [g.prompt]
  with open(g.prompts_file, encoding='utf-8') as f:
    lines = [line.rstrip('\n') for line in f]
  prompts = [line.replace('\\n', '\n') for line in lines if line.strip()]
  if not prompts:
    raise ValueError(f'generate.prompts_file={g.prompts_file!r} holds no prompt')
  return prompts


def load_config_file(path: str):
  """The draft's configs/*.py file's get_config()."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'infer.draft_config={path!r}: no such config file')
  from effjax import config as config_lib
  return config_lib.load_file(path)


def _tokenizer_id(config) -> tuple:
  d = config.data
  return (d.tokenizer, d.sentencepiece_vocab_size if d.tokenizer == 'sentencepiece' else None)


def load_draft(config, trainer):
  """(graphdef, params) of the draft model named by infer.draft_config / draft_workdir."""
  from effjax import config as config_lib
  draft_config = load_config_file(config.infer.draft_config)
  config_lib.validate(draft_config)
  if draft_config.model.vocab_size != config.model.vocab_size:
    raise ValueError(f'infer.draft_config={config.infer.draft_config}: its model.vocab_size='
                     f'{draft_config.model.vocab_size} differs from the target\'s '
                     f'{config.model.vocab_size}; speculative decoding needs one vocabulary')
  if _tokenizer_id(draft_config) != _tokenizer_id(config):
    raise ValueError(f'infer.draft_config={config.infer.draft_config}: its tokenizer '
                     f'{_tokenizer_id(draft_config)} differs from the target\'s '
                     f'{_tokenizer_id(config)}; the draft must use the same tokenizer')
  if not config.infer.draft_workdir:
    from effjax.models.lm import LM
    print('effjax: warning: infer.draft_workdir is empty: the draft is randomly initialised')
    return nnx.split(LM(draft_config.model, rngs=nnx.Rngs(draft_config.seed)))
  run = trainer.build_run(draft_config, config.infer.draft_workdir)
  with jax.set_mesh(run.mesh), shd.axis_rules(run.rules):
    state, _ = trainer._load_latest(run)  # pylint: disable=protected-access
  run.checkpointer.close()
  return run.setup.graphdef, state['params']


def calibrate(config, run, params, tolerance: float) -> tuple[float, dict]:
  """The early-exit threshold whose held-out disagreement with the full model is <= tolerance."""
  kind = config.infer.confidence
  graphdef = run.setup.graphdef
  stats_fn = jax.jit(lambda p, tok, tgt: early_exit.exit_statistics(
      nnx.merge(graphdef, p), tok, tgt, kind, run.tokenizer.vocab_size))
  batches = data_lib.make_eval_batches(config, config.infer.calibration_batches,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count())
  conf, agree = [], []
  for batch in batches:
    out = stats_fn(params, jnp.asarray(batch['inputs']), jnp.asarray(batch['targets']))
    keep = np.asarray(batch['weights']).reshape(-1) > 0
    conf.append(np.asarray(out['confidence']).reshape(out['confidence'].shape[0], -1)[:, keep])
    agree.append(np.asarray(out['agree']).reshape(out['agree'].shape[0], -1)[:, keep])
  conf, agree = np.concatenate(conf, axis=1), np.concatenate(agree, axis=1)
  threshold = early_exit.calibrate_threshold(conf, agree, tolerance)
  info = {'threshold': threshold, 'tolerance': tolerance, 'tokens': int(conf.shape[1]),
          'disagreement': early_exit.disagreement(conf, agree, threshold),
          'exit_fraction': float(np.mean(early_exit.first_exit(conf, threshold) < conf.shape[0]))}
  return threshold, info


def options_from_config(config, vocab_limit: int, stop: tuple[int, ...],
                        threshold: float | None = None) -> gen.Options:
  g, inf = config.generate, config.infer
  return gen.Options(
      method=inf.method, max_new_tokens=g.max_new_tokens,
      sampler=Sampler(g.temperature, g.top_k, g.top_p, vocab_limit),
      seed=config.seed if g.seed < 0 else g.seed, stop_tokens=stop, max_len=inf.max_len,
      weights_dtype=inf.weights_dtype, attention_kernel=inf.attention_kernel,
      output_major=w_lib.parse_names(inf.output_major),
      qmm_output_major=w_lib.parse_names(inf.qmm_output_major),
      cache_write_in_kernel=inf.cache_write_in_kernel,
      output_major_kernel=w_lib.gemv_kernel(inf.output_major_kernel),
      fold_norms=inf.fold_norms, attention_tiling=inf.decode_attention_tiling,
      exit_policy=ExitPolicy(inf.exit_threshold if threshold is None else threshold,
                             inf.confidence, inf.exit_skip),
      gamma=inf.gamma, draft_exit=inf.draft_exit)


def generate(config, workdir: str, trainer) -> list[str]:
  """The generate mode (called by effjax.train.trainer with itself, to reuse its loading)."""
  run = trainer.build_run(config, workdir)
  tok = run.tokenizer
  prompts = read_prompts(config.generate)
  stop = tuple(sorted({tok.eos_id} | {int(x) for x in config.generate.stop_tokens.split(',')
                                        if x.strip()}))
  with jax.set_mesh(run.mesh), shd.axis_rules(run.rules):
    state, step = trainer._load_latest(run)  # pylint: disable=protected-access
    params = state['params']
    threshold, calibration = None, None
    if config.infer.method == 'early_exit' and config.infer.exit_tolerance > 0:
      threshold, calibration = calibrate(config, run, params, config.infer.exit_tolerance)
      run.writer.print(f'calibrated infer.exit_threshold={threshold:.4f}: disagreement '
                       f'{calibration["disagreement"]:.4f} <= {calibration["tolerance"]}, '
                       f'{calibration["exit_fraction"]:.1%} of {calibration["tokens"]} held-out '
                       'tokens exit early')
    draft = load_draft(config, trainer) if config.infer.method == 'speculative' else None
    decoder = gen.Decoder(run.setup.graphdef, params,
                          options_from_config(config, tok.vocab_size, stop, threshold), draft)
    ids = [[tok.bos_id] + list(tok.encode(p)) for p in prompts]
    result = decoder.generate(ids)
  texts = []
  for prompt, new in zip(prompts, result.tokens):
    body = [t for t in new if t != tok.eos_id]
    texts.append(prompt + tok.decode(body))
  run.writer.print('\n-----\n'.join(texts))
  s = result.stats
  rate = s['new_tokens'] / max(s['seconds'], 1e-9)
  extra = ''
  if 'acceptance_rate' in s:
    extra = f', acceptance {s["acceptance_rate"]:.3f} over {s["rounds"]} verification passes'
  elif config.infer.method == 'early_exit':
    extra = f', exits per layer {dict(zip([*decoder.engine.exits, "final"], s["exit_histogram"]))}'
  run.writer.print(f'generate: step {step}, method {config.infer.method}, {len(prompts)} '
                   f'prompt(s), {s["new_tokens"]} new tokens in {s["seconds"]:.3f} s '
                   f'({rate:.1f} tokens/s; compile {s["compile_seconds"]:.1f} s){extra}')
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'generate.jsonl'), 'a', encoding='utf-8') as f:
      for prompt, new, text in zip(prompts, result.tokens, texts):
        f.write(json.dumps({'step': step, 'method': config.infer.method, 'prompt': prompt,
                            'tokens': new, 'text': text, 'stats': s,
                            'calibration': calibration}, default=float) + '\n')
  run.checkpointer.close()
  return texts
