"""Validation of a run's ConfigDict against configs/base.py: one clear error naming the field.

Every problem ends in a `ConfigError` whose message names the field, the value given and what is
allowed; `effjax.main` prints it as one line and exits with status 2. Checks, in order: unknown or
misspelled fields (with the closest known name), wrong types, values outside their allowed set,
then combinations (heads vs width, depth vs pattern, batch vs data-parallel size and
micro-batches, the mesh vs the devices present).
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from configs import base as base_config
from effjax.data.tokenizers import ByteTokenizer
from effjax.kernels.decode_attention import BACKENDS as DECODE_ATTENTION_BACKENDS
from effjax.kernels.quantized_matmul import KINDS as QMM_KINDS
from effjax.kernels.quantized_matmul import QMM_BACKENDS
from effjax.models import attention, early_exit, linear_attention, moe, remat
from effjax.models import lm as _lm  # noqa: F401  (registers the layer parts)
from effjax.models.registry import FEED_FORWARDS, MIXERS, parse_pattern
from effjax.optim.factory import SCHEDULES, parse_multipliers
from effjax.optim.factory import check_name as check_optimizer_name
from effjax.parallel.mesh import AXES, mesh_shape

CHOICES: dict[str, tuple[str, ...]] = {
    'mode': ('train', 'eval', 'generate', 'compile_only', 'compress'),
    'compress.method': ('', 'int8', 'w8a8', 'fp8', 'int4', 'qat_int8', 'qat_int4', 'magnitude',
                        '2:4', 'lowrank', 'lora', 'merge', 'distill'),
    'compress.prune_scope': ('layer', 'global'),
    'compress.lora_base_dtype': ('', 'float32', 'bfloat16', 'int8', 'int4'),
    'compress.lora_vocab_dtype': ('', 'bfloat16'),
    'compress.qmm_backend': QMM_BACKENDS,
    'model.attention_impl': attention.IMPLEMENTATIONS,
    'model.attention_backend': attention.BACKENDS,
    'model.scan_backend': linear_attention.BACKENDS,
    'model.remat_policy': tuple(remat.POLICIES),
    'model.param_dtype': ('float32', 'bfloat16', 'float16'),
    'model.compute_dtype': ('float32', 'bfloat16', 'float16'),
    'model.output_dtype': ('float32', 'bfloat16', 'float16'),
    'model.moe_routing': moe.ROUTINGS,
    'model.moe_gmm_backend': moe.GMM_BACKENDS,
    'data.source': ('stdlib', 'text_files', 'tfds'),
    'data.tokenizer': ('byte', 'sentencepiece'),
    'train.nan_policy': ('skip', 'stop'),
    'optim.schedule': SCHEDULES,
    'optim.hessian_probe': ('rademacher', 'gaussian'),
    'model.exit_head': early_exit.HEADS,
    'train.exit_loss_schedule': early_exit.SCHEDULES,
    'train.exit_curriculum': early_exit.CURRICULA,
    'infer.method': ('plain', 'early_exit', 'self_speculative', 'speculative'),
    'infer.confidence': early_exit.CONFIDENCES,
    'infer.weights_dtype': ('', 'float32', 'bfloat16', 'float16'),
    'infer.attention_kernel': DECODE_ATTENTION_BACKENDS,
}
POSITIVE = ('model.vocab_size', 'model.d_model', 'model.num_layers', 'model.num_heads',
            'model.num_kv_heads', 'data.seq_len', 'train.batch_size', 'train.grad_accum_steps',
            'train.steps', 'train.log_every', 'train.checkpoint_every', 'train.keep_checkpoints',
            'train.eval_batches', 'generate.max_new_tokens', 'model.moe_num_experts',
            'model.moe_top_k', 'model.ssm_state_dim', 'model.ssm_expand', 'model.ssm_head_dim',
            'model.ssm_conv_width', 'model.gla_gate_temperature')
NON_NEGATIVE = ('model.head_dim', 'model.mlp_dim', 'train.eval_every', 'optim.warmup_steps',
                'optim.hessian_rows',
                'optim.weight_decay', 'optim.clip_norm', 'optim.learning_rate', 'data.num_workers',
                'data.max_documents', 'generate.temperature', 'generate.top_k',
                'train.profile_steps', 'train.z_loss', 'train.peak_tflops',
                'train.loss_chunk_size', 'model.block_sparse_global_blocks',
                'model.block_sparse_random_blocks', 'model.block_sparse_seed',
                'model.moe_capacity_factor', 'model.moe_expert_mlp_dim',
                'model.moe_num_shared_experts', 'model.moe_aux_loss_weight',
                'model.moe_z_loss_weight', 'model.scan_chunk', 'model.ssm_dt_rank')


BYTE_VOCAB_SIZE = ByteTokenizer().vocab_size


class ConfigError(ValueError):
  """A config problem, phrased as: field=value: what is wrong; what is allowed."""


def _flatten(cfg: Any, prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in cfg.items():
    name = f'{prefix}{key}'
    if isinstance(value, (ml_collections.ConfigDict, dict)) and name != 'sharding_rules':
      out.update(_flatten(value, name + '.'))
    else:
      out[name] = value
  return out


def _type_ok(value: Any, reference: Any) -> bool:
  if isinstance(reference, bool):
    return isinstance(value, bool)
  if isinstance(reference, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(reference, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(reference, str):
    return isinstance(value, str)
  return True


def _unknown_field_message(name: str, reference: dict[str, Any]) -> str:
  close = difflib.get_close_matches(name, reference, n=1, cutoff=0.6)
  hint = f'; did you mean {close[0]}?' if close else ''
  section = name.rsplit('.', 1)[0] + '.' if '.' in name else ''
  known = sorted({k[len(section):].split('.')[0] for k in reference if k.startswith(section)})
  return f'{name}: unknown field{hint} (known fields here: {", ".join(known)})'


def describe_override_error(argv: list[str], error: Exception) -> str:
  """One line for a failed `--config.a.b=v` override: the unknown field, or the parser's reason."""
  reference = _flatten(base_config.get_config())
  for arg in argv[1:]:
    if arg.startswith('--config.'):
      name = arg[len('--config.'):].split('=', 1)[0]
      if name not in reference and not name.startswith('sharding_rules.'):
        return _unknown_field_message(name, reference)
  return ' '.join(str(error).split())


def load_file(path: str):
  """A config file's get_config() (configs/*.py, or any file defining one)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path!r}: no such config file')
  spec = importlib.util.spec_from_file_location('effjax_config_file', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def apply_overrides(config, overrides) -> Any:
  """'section.field=value' strings (the experiment scripts' --set) applied to config in place,
  each value read as the field's type; an unknown field or a value of the wrong type is one
  ConfigError naming it."""
  reference = _flatten(config)
  for item in overrides:
    name, sep, raw = item.partition('=')
    if not sep or '.' not in name:
      raise ConfigError(f'{item!r}: expected section.field=value')
    if name not in reference:
      raise ConfigError(_unknown_field_message(name, reference))
    old = reference[name]
    try:
      if isinstance(old, bool):
        if raw not in ('True', 'False'):
          raise ValueError(raw)
        value = raw == 'True'
      else:
        value = raw if old is None else type(old)(raw)
    except ValueError:
      raise ConfigError(f'{name}={raw!r}: not of type {type(old).__name__}, the type of {name}') from None
    section, field = name.rsplit('.', 1)
    node = config
    for part in section.split('.'):
      node = node[part]
    node[field] = value
  return config


def _check_fields(config) -> None:
  reference = _flatten(base_config.get_config())
  given = _flatten(config)
  for name, value in given.items():
    if name not in reference:
      raise ConfigError(_unknown_field_message(name, reference))
    if not _type_ok(value, reference[name]):
      raise ConfigError(f'{name}={value!r}: expected {type(reference[name]).__name__}, got '
                        f'{type(value).__name__}')
  for name, allowed in CHOICES.items():
    if given[name] not in allowed:
      shown = ', '.join(a or repr(a) for a in allowed)  # '' (the default "none") shown as ''
      raise ConfigError(f'{name}={given[name]!r}: allowed values are {shown}')
  for name in POSITIVE:
    if given[name] <= 0:
      raise ConfigError(f'{name}={given[name]}: must be a positive integer')
  for name in NON_NEGATIVE:
    if given[name] < 0:
      raise ConfigError(f'{name}={given[name]}: must be >= 0')
  try:
    check_optimizer_name(given['optim.name'])
  except ValueError as e:
    raise ConfigError(str(e)) from None
  try:
    parse_multipliers(given['optim.lr_multipliers'])
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if not 0 < given['optim.decay_fraction'] <= 1:
    raise ConfigError(f'optim.decay_fraction={given["optim.decay_fraction"]}: must be in (0, 1]')
  if given['optim.hessian_interval'] < 1:
    raise ConfigError(f'optim.hessian_interval={given["optim.hessian_interval"]}: must be >= 1')


def _check_model(m) -> None:
  try:
    blocks = parse_pattern(m.pattern)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  for mixer, ff in blocks:
    if mixer not in MIXERS:
      raise ConfigError(f'model.pattern={m.pattern!r}: unknown mixer {mixer!r}; allowed: '
                        f'{", ".join(MIXERS)}')
    if ff not in FEED_FORWARDS:
      raise ConfigError(f'model.pattern={m.pattern!r}: unknown feed-forward {ff!r}; allowed: '
                        f'{", ".join(FEED_FORWARDS)}')
  if m.num_layers % len(blocks):
    raise ConfigError(f'model.num_layers={m.num_layers}: must be a multiple of the {len(blocks)} '
                      f'blocks in model.pattern={m.pattern!r}')
  if not m.head_dim and m.d_model % m.num_heads:
    raise ConfigError(f'model.num_heads={m.num_heads}: must divide model.d_model={m.d_model} '
                      '(or set model.head_dim explicitly)')
  if m.num_heads % m.num_kv_heads:
    raise ConfigError(f'model.num_kv_heads={m.num_kv_heads}: must divide model.num_heads='
                      f'{m.num_heads} (grouped-query attention)')
  head_dim = m.head_dim or m.d_model // m.num_heads
  if head_dim % 2:
    raise ConfigError(f'model.head_dim={head_dim}: rotary embeddings need an even head dimension')
  if m.moe_top_k > m.moe_num_experts:
    raise ConfigError(f'model.moe_top_k={m.moe_top_k}: more than the model.moe_num_experts='
                      f'{m.moe_num_experts} experts')
  if m.moe_routing == 'expert_choice' and m.moe_capacity_factor <= 0:
    raise ConfigError(f'model.moe_capacity_factor={m.moe_capacity_factor}: expert_choice routing '
                      'needs a capacity; set it > 0 (e.g. 1.0) or use token_choice for dropless')
  gmm_device = {'triton': 'gpu', 'mosaic': 'tpu'}.get(m.moe_gmm_backend)
  if (gmm_device and any(ff == 'moe' for _, ff in parse_pattern(m.pattern)) and
      jax.default_backend() != gmm_device and not m.moe_gmm_interpret):
    raise ConfigError(f"model.moe_gmm_backend='{m.moe_gmm_backend}': needs a "
                      f"{gmm_device.upper()} but the backend is {jax.default_backend()}; use "
                      "'auto', 'ragged_dot' or model.moe_gmm_interpret=True")


def _check_recurrent_mixers(config) -> None:
  """The fields of the linear-attention and state-space mixers, checked when the pattern uses them."""
  m = config.model
  kinds = {mixer for mixer, _ in parse_pattern(m.pattern)}
  if 'mamba2' in kinds and (m.ssm_expand * m.d_model) % m.ssm_head_dim:
    raise ConfigError(f'model.ssm_head_dim={m.ssm_head_dim}: must divide the mamba2 inner width '
                      f'model.ssm_expand * model.d_model = {m.ssm_expand * m.d_model}')
  scanned = kinds & {'gla', 'retnet', 'linear_attention', 'mamba2'}
  if not scanned:
    return
  chunked_scan = linear_attention.cs
  backend = chunked_scan.resolve_backend(m.scan_backend)
  if backend in ('triton', 'mosaic'):
    device = {'triton': 'gpu', 'mosaic': 'tpu'}[backend]
    if jax.default_backend() != device and not m.scan_interpret:
      raise ConfigError(f"model.scan_backend='{backend}': needs a {device.upper()} but the "
                        f"backend is {jax.default_backend()}; use 'auto', 'xla' or "
                        'model.scan_interpret=True')
    module = chunked_scan._module(backend)  # pylint: disable=protected-access
    if hasattr(module, 'validate'):
      head_dim = m.head_dim or m.d_model // m.num_heads
      dims = []
      if scanned & {'gla', 'retnet', 'linear_attention'}:
        dims.append((head_dim, head_dim, 'model.head_dim'))
      if 'mamba2' in kinds:
        dims.append((m.ssm_state_dim, m.ssm_head_dim, 'model.ssm_state_dim/ssm_head_dim'))
      chunk = m.scan_chunk or chunked_scan.default_chunk(backend)
      for key_dim, value_dim, field in dims:
        try:
          module.validate(chunk=chunk, key_dim=key_dim, value_dim=value_dim,
                          dtype=jnp.dtype(m.compute_dtype))
        except ValueError as e:
          raise ConfigError(f'{field} / model.scan_chunk: {e}') from None


def _check_attention_kinds(config) -> None:
  """The fields of the flash-op mixers, checked only when model.pattern uses them."""
  m = config.model
  kinds = {mixer for mixer, _ in parse_pattern(m.pattern)}
  if 'sliding_window' in kinds and m.attention_window < 1:
    raise ConfigError(f'model.attention_window={m.attention_window}: the sliding_window mixer '
                      'needs a window of at least 1 key')
  if 'block_sparse' in kinds:
    if m.block_sparse_block < 1:
      raise ConfigError(f'model.block_sparse_block={m.block_sparse_block}: must be >= 1')
    if m.block_sparse_local_blocks < 1:
      raise ConfigError(f'model.block_sparse_local_blocks={m.block_sparse_local_blocks}: must be '
                        '>= 1 (a query block always sees its own block)')
    if config.data.seq_len % m.block_sparse_block:
      raise ConfigError(f'model.block_sparse_block={m.block_sparse_block}: must divide '
                        f'data.seq_len={config.data.seq_len}')
  if not kinds & set(attention.OP_KINDS):
    return
  backend = attention.fa.resolve_backend(m.attention_backend)
  if backend == 'reference':
    return
  head_dim = m.head_dim or m.d_model // m.num_heads
  if head_dim not in attention.fa.HEAD_DIMS:
    raise ConfigError(f"model.head_dim={head_dim}: the {backend} attention kernel supports "
                      f"{', '.join(map(str, attention.fa.HEAD_DIMS))}; change the head dimension "
                      "or set model.attention_backend='reference'")
  if backend == 'mosaic_gpu':
    if m.compute_dtype == 'float32':
      raise ConfigError("model.attention_backend='mosaic_gpu': the Hopper kernel computes in "
                        "bfloat16 or float16; set model.compute_dtype to one of them or use "
                        "model.attention_backend='triton'")
    if 'block_sparse' in kinds and m.block_sparse_block % 128:
      raise ConfigError(f"model.block_sparse_block={m.block_sparse_block}: "
                        "model.attention_backend='mosaic_gpu' tiles queries by 128, so the "
                        "layout block must be a multiple of 128")
  device = {'triton': 'gpu', 'mosaic_gpu': 'gpu', 'mosaic': 'tpu'}[backend]
  if jax.default_backend() != device and not m.attention_interpret:
    raise ConfigError(f"model.attention_backend='{backend}': needs a {device.upper()} but the "
                      f"backend is {jax.default_backend()}; use 'auto', 'reference' or "
                      'model.attention_interpret=True')


def _check_parallel(config, num_devices: int) -> None:
  try:
    sizes = mesh_shape(config.mesh, num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if sizes['sequence'] != 1:
    raise ConfigError(f'mesh.sequence={sizes["sequence"]}: this axis is reserved and must be 1 '
                      'for now')
  for name, axes in config.sharding_rules.items():
    axes_t = (axes,) if isinstance(axes, str) else tuple(axes or ())
    for a in axes_t:
      if a not in AXES:
        raise ConfigError(f'sharding_rules.{name}={axes!r}: {a!r} is not a mesh axis; allowed: '
                          f'{", ".join(AXES)} or None')
  t = config.train
  if t.batch_size % t.grad_accum_steps:
    raise ConfigError(f'train.batch_size={t.batch_size}: must be divisible by '
                      f'train.grad_accum_steps={t.grad_accum_steps}')
  micro = t.batch_size // t.grad_accum_steps
  rule = config.sharding_rules.get('batch')
  batch_axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
  parallel = math.prod(sizes[a] for a in batch_axes)
  if micro % parallel:
    raise ConfigError(
        f'train.batch_size={t.batch_size}: each micro-batch ({micro} sequences = batch_size / '
        f'grad_accum_steps) must be divisible by the batch-parallel size {parallel} (mesh axes '
        f'{"x".join(batch_axes)})')
  if micro % jax.process_count():
    raise ConfigError(f'train.batch_size={t.batch_size}: micro-batches must split evenly over '
                      f'{jax.process_count()} processes')
  rows = config.optim.hessian_rows
  if rows and (rows > micro or rows % parallel):
    raise ConfigError(f'optim.hessian_rows={rows}: must be a multiple of the batch-parallel size '
                      f'{parallel} and at most the {micro} rows of a micro-batch (0 = all rows)')
  m = config.model
  tensor = math.prod(sizes[a] for a in _axes_of(config, 'heads'))
  kv_tensor = math.prod(sizes[a] for a in _axes_of(config, 'kv_heads'))
  if m.num_heads % tensor:
    raise ConfigError(f'model.num_heads={m.num_heads}: not divisible by the tensor-parallel size '
                      f'{tensor}')
  if any(ff == 'moe' for _, ff in parse_pattern(m.pattern)):
    experts = math.prod(sizes[a] for a in _axes_of(config, 'experts'))
    if m.moe_num_experts % experts:
      raise ConfigError(f'model.moe_num_experts={m.moe_num_experts}: not divisible by the '
                        f'expert-parallel size {experts} (sharding_rules.experts); change '
                        'mesh.expert or the number of experts')
  if m.num_kv_heads % kv_tensor:
    raise ConfigError(f'model.num_kv_heads={m.num_kv_heads}: not divisible by the tensor-parallel '
                      f'size {kv_tensor}; use fewer tensor shards or more kv heads')


def _axes_of(config, logical: str) -> tuple[str, ...]:
  rule = config.sharding_rules.get(logical)
  return (rule,) if isinstance(rule, str) else tuple(rule or ())


def _check_early_exit(config) -> None:
  """The exit heads, their training losses and the inference engine's fields."""
  m, t, inf, g = config.model, config.train, config.infer, config.generate
  try:
    exits = early_exit.parse_exit_layers(m)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  weights = [w.strip() for w in t.exit_loss_weights.split(',') if w.strip()]
  try:
    bad = [w for w in weights if float(w) < 0]
  except ValueError:
    bad = weights
  if bad or (weights and len(weights) != len(exits)):
    raise ConfigError(f'train.exit_loss_weights={t.exit_loss_weights!r}: give one non-negative '
                      f'weight per exit of model.exit_layers={m.exit_layers!r} ({len(exits)})')
  for name in ('exit_loss_scale', 'exit_distill_weight'):
    if t[name] < 0:
      raise ConfigError(f'train.{name}={t[name]}: must be >= 0')
  if t.exit_distill_temperature <= 0:
    raise ConfigError(f'train.exit_distill_temperature={t.exit_distill_temperature}: must be > 0')
  if t.exit_curriculum_period < 1 or t.exit_curriculum_steps < 0:
    raise ConfigError(f'train.exit_curriculum_period={t.exit_curriculum_period} / '
                      f'exit_curriculum_steps={t.exit_curriculum_steps}: need a period >= 1 and '
                      'steps >= 0')
  if not 0 < g.top_p <= 1:
    raise ConfigError(f'generate.top_p={g.top_p}: must be in (0, 1] (1 = off)')
  try:
    [int(x) for x in g.stop_tokens.split(',') if x.strip()]
  except ValueError:
    raise ConfigError(f'generate.stop_tokens={g.stop_tokens!r}: give comma-separated token ids') \
        from None
  if inf.gamma < 1:
    raise ConfigError(f'infer.gamma={inf.gamma}: must be >= 1 (tokens drafted per pass)')
  if inf.max_len < 0 or inf.calibration_batches < 1:
    raise ConfigError(f'infer.max_len={inf.max_len} / infer.calibration_batches='
                      f'{inf.calibration_batches}: need max_len >= 0 and >= 1 batch')
  if not 0 <= inf.exit_tolerance < 1:
    raise ConfigError(f'infer.exit_tolerance={inf.exit_tolerance}: must be in [0, 1)')
  try:
    from effjax.kernels import decode_attention as decode_kernel
    decode_kernel.parse_tiling(inf.decode_attention_tiling)
  except ValueError as e:
    raise ConfigError(f'infer.decode_attention_tiling: {e}') from None
  if inf.method in ('early_exit', 'self_speculative') and not exits:
    raise ConfigError(f'infer.method={inf.method}: needs exit heads; set model.exit_layers '
                      "(e.g. '2') and train with them")
  if inf.draft_exit and inf.draft_exit not in exits:
    raise ConfigError(f'infer.draft_exit={inf.draft_exit}: not one of model.exit_layers='
                      f'{m.exit_layers!r} (0 = the first exit)')
  if inf.method == 'speculative' and config.mode == 'generate' and not inf.draft_config:
    raise ConfigError("infer.draft_config='': infer.method=speculative needs a draft model "
                      'config file (and infer.draft_workdir for its checkpoint)')
  if config.mode == 'generate':
    for mixer, _ in parse_pattern(m.pattern):
      if not callable(getattr(MIXERS.get(mixer), 'decode', None)):
        raise ConfigError(f'model.pattern={m.pattern!r}: the {mixer!r} mixer cannot decode with '
                          'a cache, so --mode=generate cannot run it')


def _check_compress(config) -> None:
  """The compression section (effjax/compress/): numbers in range, what --mode=compress needs."""
  cp = config.compress
  for name in ('int4_group_size', 'lora_rank', 'calibration_batches', 'decode_context',
               'decode_steps'):
    if cp[name] < 1:
      raise ConfigError(f'compress.{name}={cp[name]}: must be a positive integer')
  for name in ('finetune_steps', 'finetune_learning_rate', 'distill_weight',
               'distill_hidden_weight'):
    if cp[name] < 0:
      raise ConfigError(f'compress.{name}={cp[name]}: must be >= 0')
  if not 0 <= cp.prune_sparsity < 1:
    raise ConfigError(f'compress.prune_sparsity={cp.prune_sparsity}: must be in [0, 1)')
  if not 0 < cp.lowrank_energy <= 1:
    raise ConfigError(f'compress.lowrank_energy={cp.lowrank_energy}: must be in (0, 1]')
  if cp.distill_temperature <= 0:
    raise ConfigError(f'compress.distill_temperature={cp.distill_temperature}: must be > 0')
  if not [n for n in cp.targets.split(',') if n.strip()]:
    raise ConfigError("compress.targets='': name at least one parameter, e.g. 'wq,wo,w_up'")
  if config.infer.attention_kernel == 'triton' and jax.default_backend() != 'gpu':
    raise ConfigError(f"infer.attention_kernel='triton': needs a GPU but the backend is "
                      f"{jax.default_backend()}; use 'auto' or 'xla'")
  for field, kinds in (('compress.qmm_gemv', cp.qmm_gemv),
                       ('infer.qmm_output_major', config.infer.qmm_output_major)):
    if any(n.strip() not in QMM_KINDS for n in kinds.split(',') if n.strip()):
      raise ConfigError(f"{field}={kinds!r}: allowed are the kinds "
                        f"{' and '.join(repr(k) for k in QMM_KINDS)}, comma-separated, or '' (none)")
  if cp.qmm_backend == 'triton' and jax.default_backend() != 'gpu' and not cp.qmm_interpret:
    raise ConfigError(f"compress.qmm_backend='triton': needs a GPU but the backend is "
                      f"{jax.default_backend()}; use 'auto', 'xla' or "
                      'compress.qmm_interpret=True')
  if config.mode == 'compress':
    if not cp.method:
      raise ConfigError("compress.method='': --mode=compress needs a method; allowed: "
                        + ', '.join(m for m in CHOICES['compress.method'] if m))
    if not cp.out_workdir:
      raise ConfigError("compress.out_workdir='': --mode=compress needs an output directory "
                        '(it must not exist yet)')
    if cp.method == 'distill' and cp.finetune_steps < 1:
      raise ConfigError("compress.finetune_steps=0: compress.method='distill' trains the "
                        'student; give it steps (e.g. 200)')
  if cp.method == 'merge' and config.mode != 'compress':
    raise ConfigError("compress.method='merge' is for --mode=compress (it writes a dense model)")


def validate(config, num_devices: int | None = None) -> None:
  """Raise ConfigError on the first problem; return None for a config that can run."""
  _check_fields(config)
  _check_model(config.model)
  if config.data.source == 'text_files' and not config.data.glob:
    raise ConfigError("data.glob='': data.source=text_files needs a glob such as '/data/**/*.txt'")
  if config.data.source == 'tfds' and not config.data.tfds_name:
    raise ConfigError("data.tfds_name='': data.source=tfds needs a dataset name, e.g. 'lm1b'")
  tokenizer_vocab = (config.data.sentencepiece_vocab_size
                     if config.data.tokenizer == 'sentencepiece' else BYTE_VOCAB_SIZE)
  if config.model.vocab_size < tokenizer_vocab:
    raise ConfigError(f'model.vocab_size={config.model.vocab_size}: smaller than the '
                      f'{config.data.tokenizer} tokenizer vocabulary ({tokenizer_vocab}); set it to '
                      f'at least {tokenizer_vocab} (a multiple of 128 is fastest)')
  if config.model.attention_impl == 'cudnn' and jax.default_backend() != 'gpu':
    raise ConfigError(f"model.attention_impl='cudnn': needs a GPU but the backend is "
                      f"{jax.default_backend()}; use 'auto' or 'xla'")
  _check_attention_kinds(config)
  _check_recurrent_mixers(config)
  _check_early_exit(config)
  if config.optim.warmup_steps > config.train.steps:
    raise ConfigError(f'optim.warmup_steps={config.optim.warmup_steps}: longer than '
                      f'train.steps={config.train.steps}')
  chunk = config.train.loss_chunk_size
  if chunk and config.data.seq_len % chunk:
    raise ConfigError(f'train.loss_chunk_size={chunk}: must divide data.seq_len='
                      f'{config.data.seq_len} (or be 0 for the unchunked loss)')
  if not 0 <= config.optim.min_lr_ratio <= 1:
    raise ConfigError(f'optim.min_lr_ratio={config.optim.min_lr_ratio}: must be in [0, 1]')
  if not 0 <= config.data.validation_percent < 100:
    raise ConfigError(f'data.validation_percent={config.data.validation_percent}: must be in '
                      '[0, 100)')
  _check_compress(config)
  _check_parallel(config, jax.device_count() if num_devices is None else num_devices)
