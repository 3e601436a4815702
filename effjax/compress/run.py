"""`--mode=compress`: a trained checkpoint in, a compressed checkpoint and a report out.

    python -m effjax.main --config=configs/default.py --workdir=SRC --mode=compress \
        --config.compress.method=int8 --config.compress.out_workdir=OUT

Reads the latest checkpoint of SRC (the config must describe it: a mismatch stops with the
parameter named, before anything is written), compresses it per config.compress, and writes OUT:
`checkpoints/0` (parameters and a fresh optimizer state of the compressed model), the
`compression.json` record, `config.json`, then optionally fine-tunes it there
(compress.finetune_steps, the normal trainer) and writes `report.json` / `report.md`: parameter
bytes, decode tokens/s at batch 1 and held-out loss, before and after. SRC is only read; an
existing OUT is refused.

Every mode reading OUT applies `compression.json` to its config itself (`apply_recorded`), so
`--mode=eval`, `--mode=generate` and `--mode=train` (fine-tuning) with the source's config load
the compressed model as it is: int8 / int4 values and their scales, adapters, factors.
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effjax.compress import lowrank, prune
from effjax.compress import quantize as q_lib
from effjax.compress import weights as w_lib
from effjax.models.registry import parse_pattern

RECORD = 'compression.json'
METHODS = ('int8', 'w8a8', 'fp8', 'int4', 'qat_int8', 'qat_int4', 'magnitude', '2:4', 'lowrank',
           'lora', 'merge', 'distill')
RECORDED = ('method', 'targets', 'int4_group_size', 'lowrank_ranks', 'lora_rank', 'lora_alpha',
            'lora_base_dtype', 'lora_vocab_dtype', 'teacher_model', 'distill_temperature',
            'distill_weight', 'distill_hidden_weight')


# The record's format. 2: W8A8 activation scales are calibrated for the projections of every
# mixer (format 1 calibrated only attention's and the feed-forwards'; the others kept a
# placeholder scale of 1.0, harmless while their products dequantized the weight, wrong once
# they multiplied int8 by int8). 3: a LoRA model's frozen base may be a quantized weight
# (compress.lora_base_dtype int8 / int4) and its vocabulary matrices narrower
# (compress.lora_vocab_dtype); written only for such a model, so code that reads format 2 still
# reads every other record. 4: W8A8 also calibrates the MoE layer's routed experts, which now
# multiply int8 rows by int8 weights (earlier records kept the placeholder scale for them,
# harmless while their grouped matmul dequantized the weights); written only for W8A8 models
# with a MoE layer.
FORMAT = 4
# Mixers whose W8A8 scales format 1 calibrated (the attention family); the MoE shared experts
# were not calibrated either.
_FORMAT1_CALIBRATED = ('attention', 'dense', 'flash', 'sliding_window', 'block_sparse')


def _has_moe(blocks) -> bool:
  """Whether a parsed pattern has a MoE feed-forward."""
  return any(ff == 'moe' for _, ff in blocks)


def _check_format(record: dict, config, path: str) -> None:
  """One clear error for a record this code would read wrongly."""
  version = record.get('format', 1)
  if version > FORMAT:
    raise ValueError(f'{path} has format {version}; this code reads formats up to {FORMAT}: '
                     'update effjax to load it')
  if version < 4 and record['compress']['method'] == 'w8a8':
    model = dict(config.model)
    model.update(record.get('model', {}))
    blocks = parse_pattern(model['pattern'])
    moe = _has_moe(blocks)
    stale = []
    if version < 2:
      stale = sorted({m for m, _ in blocks} - set(_FORMAT1_CALIBRATED))
      if model.get('moe_num_shared_experts', 0) and moe:
        stale.append('the MoE shared experts')
    if moe:
      stale.append('the MoE routed experts')
    if stale:
      source = record.get('source', {}).get('workdir', 'the source checkpoint')
      raise ValueError(
          f'{path}: this W8A8 model was written before activation scales were calibrated for '
          f'{", ".join(stale)}; their int8 activations would use an uncalibrated scale and give '
          f'wrong outputs. Compress {source} again with --mode=compress '
          "--config.compress.method=w8a8 (nothing here was changed)")


def apply_recorded(config, workdir: str):
  """config with the compression recorded in workdir applied (unchanged where there is none)."""
  path = os.path.join(workdir, RECORD)
  if not os.path.exists(path):
    return config
  with open(path, encoding='utf-8') as f:
    record = json.load(f)
  given, recorded = config.compress.method, record['compress']['method']
  if given not in ('', recorded) and config.mode != 'compress':
    raise ValueError(f'compress.method={given!r}: {workdir} holds a {recorded or "dense"!r} '
                     f'model ({path}); leave compress.method unset to load it')
  _check_format(record, config, path)
  config = copy.deepcopy(config)
  with config.unlocked():
    for key, value in record['compress'].items():
      config.compress[key] = value
    for key, value in record.get('model', {}).items():
      config.model[key] = value
  return config


def parse_overrides(spec: str) -> dict[str, Any]:
  """'num_layers=2,d_model=128' -> {'num_layers': 2, 'd_model': 128} (ints, floats, bools, str)."""
  out = {}
  for item in filter(None, (s.strip() for s in spec.split(','))):
    key, sep, raw = item.partition('=')
    if not sep:
      raise ValueError(f'compress.student_model={spec!r}: expected FIELD=VALUE pairs')
    value: Any = raw.strip()
    for cast in (int, float):
      try:
        value = cast(value)
        break
      except ValueError:
        pass
    if value in ('True', 'False'):
      value = value == 'True'
    out[key.strip()] = value
  return out


# ------------------------------------------------------------------ measurement

def param_bytes(params) -> int:
  """Bytes of the parameters at their storage widths (int4 = half a byte); no teacher."""
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if any(getattr(k, 'key', None) == 'teacher' for k in path):
      continue
    total += leaf.size * q_lib.bits(leaf.dtype) // 8
  return int(total)


def decode_params(params, compute_dtype):
  """What decoding reads: float weights cast once to the compute dtype (the bf16 baseline on
  GPU), quantized values and their scales as stored."""
  def cast(path, leaf):
    names = {str(getattr(k, 'key', '')) for k in path}
    if jnp.issubdtype(leaf.dtype, jnp.floating) and not names & w_lib.QUANT_SCALE_NAMES and \
        jnp.dtype(leaf.dtype).itemsize > jnp.dtype(compute_dtype).itemsize:
      return leaf.astype(compute_dtype)
    return leaf
  return jax.tree_util.tree_map_with_path(cast, params)


def measure(run, params, eval_batches, compress_cfg) -> dict[str, Any]:
  from effjax.bench import decode as decode_bench
  from effjax.train import step as step_lib
  from effjax.train import trainer
  out: dict[str, Any] = {'bytes': param_bytes(params)}
  ev = trainer._evaluate(run, step_lib.make_eval_step(run.setup), params, eval_batches)  # pylint: disable=protected-access
  out.update(loss=ev['loss'], perplexity=ev['perplexity'], eval_tokens=ev['tokens'])
  dparams = decode_params(params, run.config.model.compute_dtype)
  out['decode_bytes'] = param_bytes(dparams)
  try:
    row = decode_bench.time_decode(run.setup.graphdef, dparams, compress_cfg.decode_context,
                                   steps=compress_cfg.decode_steps, batch=1,
                                   output_major=w_lib.parse_names(run.config.infer.output_major),
                                   qmm_output_major=w_lib.parse_names(
                                       run.config.infer.qmm_output_major),
                                   cache_write_in_kernel=run.config.infer.cache_write_in_kernel,
                                   output_major_kernel=w_lib.gemv_kernel(
                                       run.config.infer.output_major_kernel))
    out.update({f'decode_{k}': v for k, v in row.items()})
  except Exception as e:  # pylint: disable=broad-except
    out['decode_error'] = f'{type(e).__name__}: {e}'.splitlines()[0]
  return out


def calibrate_activations(model, batches, targets) -> dict[str, np.ndarray]:
  """{weight path key: max|input| per layer} over held-out batches (W8A8's static scales)."""
  table: dict[str, dict[int, float]] = {}

  def sink(key, layer, amax):
    per = table.setdefault(str(key), {})
    per[int(layer)] = max(per.get(int(layer), 0.0), float(amax))

  observed = nnx.merge(*nnx.split(model))  # shares the arrays
  w_lib.observe(observed, targets, sink)
  graphdef, state = nnx.split(observed)

  @jax.jit
  def forward(state, mb):
    return nnx.merge(graphdef, state)(mb['inputs'], mb['positions'], mb.get('segment_ids'))

  for mb in batches:
    jax.block_until_ready(forward(state, mb))
  jax.effects_barrier()
  out = {}
  for key, per in table.items():
    values = np.array([per[i] for i in sorted(per)], np.float32)
    out[key] = values if len(values) > 1 or sorted(per) != [0] else values[0]
  return out


# ------------------------------------------------------------------ the mode

def _check_out(out: str, workdir: str) -> None:
  if not out:
    raise ValueError("compress.out_workdir='': --mode=compress needs an output directory")
  if os.path.realpath(out) == os.path.realpath(workdir):
    raise ValueError(f'compress.out_workdir={out}: must differ from --workdir (the source is '
                     'never written)')
  if os.path.exists(out) and os.listdir(out):
    raise ValueError(f'compress.out_workdir={out} already exists and is not empty; refusing to '
                     'overwrite it (choose a new directory or remove it yourself)')


def _restore_into(run, model) -> dict:
  """The state for run's setup built from a concrete model (parameters matched by path)."""
  from effjax.train.checkpoint import _leaves_by_name, _restore_target  # pylint: disable=protected-access
  params = nnx.state(model, nnx.Param)
  target = run.setup.abstract_state['params']
  have = _leaves_by_name(checkpoint_unbox(params))
  want = _leaves_by_name(_restore_target(target))
  missing = sorted(set(want) ^ set(have))
  if missing:
    raise ValueError(f'internal: compressed parameters do not match the model built from the '
                     f'compressed config: {missing[:5]}')
  leaves = [jax.device_put(jnp.asarray(have[n]).astype(want[n].dtype), want[n].sharding)
            for n in want]
  params = jax.tree.unflatten(jax.tree.structure(target), leaves)
  opt_state = jax.jit(run.setup.optimizer.init,
                      out_shardings=run.setup.state_shardings['opt_state'])(params)
  return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': opt_state}


def checkpoint_unbox(tree):
  return jax.tree.map(lambda x: x.get_value() if isinstance(x, nnx.Variable) else x, tree,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def compress(config, workdir: str) -> dict[str, Any]:
  """The --mode=compress entry point; returns the report."""
  from effjax import data as data_lib
  from effjax.parallel import sharding as shd
  from effjax.train import step as step_lib
  from effjax.train import trainer

  cfg = config.compress
  if cfg.method not in METHODS:
    raise ValueError(f'compress.method={cfg.method!r}: allowed with --mode=compress: '
                     f'{", ".join(METHODS)}')
  out = cfg.out_workdir
  _check_out(out, workdir)
  if cfg.method == 'distill' and cfg.finetune_steps < 1:
    raise ValueError("compress.method='distill' trains the student: set compress.finetune_steps")
  started = time.perf_counter()

  # The source as recorded in its workdir (a LoRA or QAT model for 'merge' / re-compression).
  src_config = copy.deepcopy(config)
  with src_config.unlocked():
    src_config.compress.method = ''
  src_config = apply_recorded(src_config, workdir)
  src_method = src_config.compress.method
  if src_method == 'distill':
    raise ValueError(f'{workdir} holds a student with its teacher; compress it after merging')
  src = trainer.build_run(src_config, workdir, read_only=True)  # nothing is written to SRC
  log = print if jax.process_index() == 0 else (lambda line: None)
  with jax.set_mesh(src.mesh), shd.axis_rules(src.rules):
    state, step = trainer._load_latest(src)  # pylint: disable=protected-access
    eval_batches = data_lib.make_eval_batches(config, config.train.eval_batches,
                                              process_index=jax.process_index(),
                                              process_count=jax.process_count())
    before = measure(src, state['params'], eval_batches, cfg)
    log(f'source (step {step}): {before["bytes"] / 2**20:.2f} MiB, held-out loss '
        f'{before["loss"]:.4f}, decode {before.get("decode_tokens_per_s", float("nan")):.0f} '
        'tokens/s')
    model = nnx.merge(src.setup.graphdef, state['params'])
    if src_method in w_lib.STRUCTURAL:
      w_lib.densify(model)

    method = cfg.method
    out_config = copy.deepcopy(config)
    details: dict[str, Any] = {}
    model_changes: dict[str, Any] = {}
    with out_config.unlocked():
      out_config.compress.method = '' if method == 'merge' else method
      if method == 'lowrank':
        ranks = lowrank.choose_ranks(model, cfg)
        out_config.compress.lowrank_ranks = ','.join(f'{k}={v}' for k, v in sorted(ranks.items()))
        details['ranks'] = ranks
      if method == 'distill':
        out_config.compress.teacher_model = json.dumps(src_config.model.to_dict())
        model_changes = parse_overrides(cfg.student_model)
        for key, value in model_changes.items():
          if key not in out_config.model:
            raise ValueError(f'compress.student_model: model.{key} is not a model field')
          out_config.model[key] = value
    if method == 'w8a8':
      calib = [jax.tree.map(lambda x: x[0], step_lib.device_batch(src.setup, b, 1))
               for b in eval_batches[:max(cfg.calibration_batches, 1)]]
      act_amax = calibrate_activations(model, calib, w_lib.target_names(cfg))
      details['calibrated'] = sorted(act_amax)
      # Targets whose product never saw an activation (none in the models here: every mixer's
      # projections and the MoE layer's experts report their inputs): such a product keeps the
      # placeholder scale, so the list would name what to calibrate next.
      details['not_calibrated'] = sorted(
          {w_lib.path_key(p + (n,)) for p, _, n in
           w_lib.find_targets(model, w_lib.target_names(cfg))} - set(act_amax))
      w_lib.restructure(model, out_config, act_amax=act_amax)
    elif method in w_lib.STRUCTURAL:
      w_lib.restructure(model, out_config)
    elif method in w_lib.PRUNE_METHODS:
      details['sparsity'] = prune.prune_model(model, cfg, method)
    elif method == 'distill':
      from effjax.models.lm import LM
      teacher = model
      model = LM(out_config.model, rngs=nnx.Rngs(config.seed))
      model.teacher = teacher

  os.makedirs(out, exist_ok=True)
  new_lora = (out_config.compress.get('lora_base_dtype') in w_lib.LORA_QUANTIZED_BASES or
              bool(out_config.compress.get('lora_vocab_dtype')))
  method = out_config.compress.method
  moe = _has_moe(parse_pattern(out_config.model.pattern))
  record = {'format': FORMAT if method == 'w8a8' and moe else
                      3 if method == 'lora' and new_lora else 2,
            'compress': {k: out_config.compress[k] for k in RECORDED}, 'model': model_changes,
            'source': {'workdir': os.path.abspath(workdir), 'step': step, 'method': src_method}}
  dst = trainer.build_run(out_config, out, read_only=True)
  with jax.set_mesh(dst.mesh), shd.axis_rules(dst.rules):
    new_state = _restore_into(dst, model)
    dst.checkpointer.save(0, new_state, force=True,
                          metadata={'step': 0, 'config': out_config.to_dict(), 'compression': record})
    dst.checkpointer.wait()
  with open(os.path.join(out, RECORD), 'w', encoding='utf-8') as f:
    json.dump(record, f, indent=2)
  with open(os.path.join(out, 'config.json'), 'w', encoding='utf-8') as f:
    f.write(out_config.to_json_best_effort(indent=2))
  del state, new_state, model
  dst.checkpointer.close()

  if cfg.finetune_steps:
    ft_config = copy.deepcopy(out_config)
    with ft_config.unlocked():
      ft_config.train.steps = cfg.finetune_steps
      ft_config.optim.warmup_steps = min(ft_config.optim.warmup_steps, cfg.finetune_steps // 10)
      ft_config.train.checkpoint_every = cfg.finetune_steps
      ft_config.train.eval_every = 0
      ft_config.generate.at_end = False
      if cfg.finetune_learning_rate:
        ft_config.optim.learning_rate = cfg.finetune_learning_rate
    log(f'fine-tuning the {method} model for {cfg.finetune_steps} steps')
    trainer.train(ft_config, out)

  final = trainer.build_run(out_config, out, read_only=True)
  with jax.set_mesh(final.mesh), shd.axis_rules(final.rules):
    fstate, fstep = trainer._load_latest(final)  # pylint: disable=protected-access
    after = measure(final, fstate['params'], eval_batches, cfg)
  final.checkpointer.close()
  report = {'method': method, 'source': record['source'], 'out_workdir': os.path.abspath(out),
            'finetune_steps': cfg.finetune_steps, 'final_step': fstep, 'before': before,
            'after': after, 'details': details, 'device': jax.devices()[0].device_kind,
            'seconds': time.perf_counter() - started}
  write_report(out, report)
  log(report_markdown(report))
  return report


def _ratio(a, b) -> str:
  return f'{a / b:.2f}x' if a and b else '-'


def report_markdown(report: dict[str, Any]) -> str:
  b, a = report['before'], report['after']
  rows = [('parameter bytes (stored)', f'{b["bytes"]:,}', f'{a["bytes"]:,}',
           _ratio(a['bytes'], b['bytes'])),
          ('bytes read by decoding', f'{b["decode_bytes"]:,}', f'{a["decode_bytes"]:,}',
           _ratio(a['decode_bytes'], b['decode_bytes'])),
          ('decode tokens/s (batch 1)', f'{b.get("decode_tokens_per_s", 0):.1f}',
           f'{a.get("decode_tokens_per_s", 0):.1f}',
           _ratio(a.get('decode_tokens_per_s'), b.get('decode_tokens_per_s'))),
          ('held-out loss', f'{b["loss"]:.4f}', f'{a["loss"]:.4f}',
           f'{a["loss"] - b["loss"]:+.4f}'),
          ('held-out perplexity', f'{b["perplexity"]:.3f}', f'{a["perplexity"]:.3f}',
           f'{100 * (a["perplexity"] / b["perplexity"] - 1):+.2f}%')]
  lines = [f'# Compression report: {report["method"]}', '',
           f'source {report["source"]["workdir"]} (step {report["source"]["step"]}), output '
           f'{report["out_workdir"]} (step {report["final_step"]}, {report["finetune_steps"]} '
           f'fine-tuning steps), on {report["device"]}', '',
           '| | before | after | after / before |', '| --- | --- | --- | --- |']
  lines += [f'| {r[0]} | {r[1]} | {r[2]} | {r[3]} |' for r in rows]
  return '\n'.join(lines) + '\n'


def write_report(out: str, report: dict[str, Any]) -> None:
  with open(os.path.join(out, 'report.json'), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=2, default=lambda x: x.tolist() if hasattr(x, 'tolist') else str(x))
  with open(os.path.join(out, 'report.md'), 'w', encoding='utf-8') as f:
    f.write(report_markdown(report))
