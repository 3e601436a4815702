"""The jitted steps: state initialisation, training (with accumulation and a NaN guard), evaluation.

The train state is a plain dict {'step', 'params', 'opt_state'}; params is an nnx.State whose
Variables carry logical axis names, and optax's moment trees mirror it, so every array's sharding
follows from the same rules. Each step is one `jax.jit` with explicit in/out shardings and the
state donated (the pjit pattern).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from effjax.compress import training as compress_training
from effjax.models import attention, early_exit, moe
from effjax.models.lm import LM, block_kinds, head_logits
from effjax.optim import sophia
from effjax.optim.factory import HESSIAN_ESTIMATORS
from effjax.parallel import sharding as shd
from effjax.train import losses

State = dict[str, Any]
BATCH_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'weights')


@dataclasses.dataclass
class TrainSetup:
  """Everything derived once from the config: model structure, optimizer, shardings, steps."""
  graphdef: Any
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: State  # ShapeDtypeStructs carrying their shardings
  state_shardings: Any
  batch_sharding: NamedSharding  # for [micro_batches, rows, length] arrays
  mesh: jax.sharding.Mesh
  build: Callable[[int], State]  # seed -> fresh state (unsharded function; see init)
  # (path names, leaf) -> whether the step differentiates and updates it; None = every parameter
  # (effjax.compress.training: LoRA adapters only, quantized values frozen, ...).
  trainable: Callable[[tuple, Any], bool] | None = None

  def init(self, seed: int) -> State:
    """Initialise directly sharded: each device materialises only its own shards."""
    return jax.jit(self.build, out_shardings=self.state_shardings)(seed)


def make_setup(config, optimizer, schedule, mesh) -> TrainSetup:
  """Abstract model -> shardings, checked for divisibility. Call under the rules/mesh context."""
  model_cfg = config.model
  # A compressed model (config.compress) has its own structure, frozen parts and masks.
  optimizer, trainable = compress_training.wrap_optimizer(config, optimizer)

  def build(seed):
    model = compress_training.build_model(config, nnx.Rngs(jax.random.key(seed)))
    params = nnx.state(model, nnx.Param)
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'opt_state': optimizer.init(params)}

  abstract_model = nnx.eval_shape(lambda: compress_training.build_model(config, nnx.Rngs(0)))
  graphdef = nnx.graphdef(abstract_model)
  shapes = jax.eval_shape(build, 0)
  specs = shd.param_specs(shapes)  # optax moments mirror params
  shd.check_divisible(shapes['params'], specs['params'], mesh)
  shardings = shd.named(mesh, specs)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
  batch_sharding = NamedSharding(mesh, P(None, *shd.logical_to_spec(('batch', 'act_length'))))
  return TrainSetup(graphdef, optimizer, schedule, abstract, shardings, batch_sharding, mesh, build,
                    trainable)


def token_losses(logits_btv: jax.Array, targets_bt: jax.Array, weights_bt: jax.Array,
                 z_loss: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Summed cross-entropy, summed z-loss and token count, all float32."""
  logits = logits_btv.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets_bt)
  weights = weights_bt.astype(jnp.float32)
  z_sum = jnp.zeros((), jnp.float32)
  if z_loss:
    z_sum = z_loss * jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1)) * weights)
  return jnp.sum(ce * weights), z_sum, jnp.sum(weights)


def _forward_losses(graphdef, params, mb: dict[str, jax.Array], z_loss: float,
                    loss_chunk_size: int = 0):
  """(summed cross-entropy, summed z-loss, token count, MoE statistics ({} without MoE))."""
  model = nnx.merge(graphdef, params)
  if loss_chunk_size:
    x, moe_stats = model.features_and_stats(mb['inputs'], mb['positions'], mb.get('segment_ids'))
    total, ce_sum = losses.chunked_cross_entropy(x, model.head_matrix(), mb['targets'],
                                                 mb['weights'], float(z_loss), loss_chunk_size,
                                                 model.precision.output)
    count = jnp.sum(mb['weights'].astype(jnp.float32))
    return ce_sum, total - jax.lax.stop_gradient(ce_sum), count, moe_stats
  # Without segment ids every row is one causal sequence (no document mask).
  logits, moe_stats = model.logits_and_stats(mb['inputs'], mb['positions'], mb.get('segment_ids'))
  return (*token_losses(logits, mb['targets'], mb['weights'], z_loss), moe_stats)


def _forward_losses_with_exits(graphdef, params, mb: dict[str, jax.Array], z_loss: float,
                               loss_chunk_size: int, distill_temperature: float):
  """_forward_losses plus each exit's summed losses ({'ce', 'correct', 'kl'}, [E] each)."""
  model = nnx.merge(graphdef, params)
  exits, x, moe_stats = early_exit.hidden_states(model, mb['inputs'], mb['positions'],
                                                 mb.get('segment_ids'))
  count = jnp.sum(mb['weights'].astype(jnp.float32))
  if loss_chunk_size:
    total, ce_sum = losses.chunked_cross_entropy(x, model.head_matrix(), mb['targets'],
                                                 mb['weights'], float(z_loss), loss_chunk_size,
                                                 model.precision.output)
    z_sum = total - jax.lax.stop_gradient(ce_sum)
  else:
    logits = head_logits(x, model.head_matrix(), model.precision.output)
    ce_sum, z_sum, _ = token_losses(logits, mb['targets'], mb['weights'], z_loss)
  sums = early_exit.exit_losses(model, exits, x, mb['targets'], mb['weights'],
                                chunk=loss_chunk_size, distill_temperature=distill_temperature)
  return ce_sum, z_sum, count, moe_stats, sums


def exit_options(config) -> dict[str, Any]:
  """make_train_step's early-exit argument from the config (empty without model.exit_layers)."""
  return {'exit_train_cfg': config.train} if early_exit.parse_exit_layers(config.model) else {}


def _complete(full_params) -> Callable[[Any], Any]:
  """params as an optimizer under optax's masking sees them (a frozen leaf replaced by an empty
  MaskedNode) -> the whole tree, frozen leaves taken from full_params as constants. A derivative
  taken through it is one over the trainable leaves only."""
  masked = lambda x: isinstance(x, optax.MaskedNode)
  return lambda p: jax.tree.map(
      lambda sub, full: jax.lax.stop_gradient(full) if masked(sub) else sub, p, full_params,
      is_leaf=masked)


def hessian_fn_for(estimator: str, graphdef, mb: dict[str, jax.Array], key: jax.Array,
                   probe: str = 'rademacher', full_params=None) -> Callable[[Any], Any]:
  """params -> diagonal Hessian estimate on micro-batch `mb`, for Sophia's periodic refresh.

  'gnb' (Sophia-G): labels sampled from the model's own logits, the squared gradient of that loss
  scaled by the batch size. 'hutchinson' (Sophia-H): u * (H u) for a random probe u. Under jit the
  gradient inside either estimate is a global one, so on a data-parallel mesh the estimate is
  averaged over replicas exactly like the training gradient. With full_params (a model with
  frozen parameters: LoRA's base, quantized weights) params is the masked tree the optimizer
  sees, and the estimate covers the trainable leaves alone.
  """
  whole = (lambda p: p) if full_params is None else _complete(full_params)

  def logits_fn(p):
    model = nnx.merge(graphdef, whole(p))
    return model(mb['inputs'], mb['positions'], mb.get('segment_ids'))

  def loss_fn(p):  # the plain head: the chunked loss is a custom VJP, which forward-mode can't pass
    with attention.forward_differentiable():  # nor can cuDNN attention
      ce_sum, _, count, _ = _forward_losses(graphdef, whole(p), mb, 0.0)
    return ce_sum / jnp.maximum(count, 1.0)

  if estimator == 'gnb':
    return lambda p: sophia.gauss_newton_bartlett(logits_fn, p, key, weights=mb['weights'])
  if estimator == 'hutchinson':
    return lambda p: sophia.hutchinson(loss_fn, p, key, distribution=probe)
  raise ValueError(f'unknown Hessian estimator {estimator!r}; allowed: gnb, hutchinson')


def hessian_rows_of(mb: dict[str, jax.Array], rows: int, sharding: NamedSharding) -> dict:
  """The first rows/S rows of each of the S data-parallel shards of a [rows, length] micro-batch.

  Sophia's estimate needs far fewer tokens than the gradient (the paper estimates on a fraction of
  the batch), and the refresh is its whole overhead. Taking the same number of rows from every
  shard keeps the work balanced and local: no row moves between devices.
  """
  total = next(iter(mb.values())).shape[0]
  if not rows or rows == total:
    return mb
  shards = total // sharding.shard_shape((1,) + next(iter(mb.values())).shape)[1]
  if rows > total or rows % shards:
    raise ValueError(f'optim.hessian_rows={rows}: must be a multiple of the {shards} data-parallel '
                     f'shards and at most the {total} rows of a micro-batch (0 = all rows)')
  def take(x):
    x = x.reshape((shards, total // shards) + x.shape[1:])[:, :rows // shards]
    return x.reshape((rows,) + x.shape[2:])
  spec = NamedSharding(sharding.mesh, P(*sharding.spec[1:]))
  return {k: jax.lax.with_sharding_constraint(take(v), spec) for k, v in mb.items()}


def hessian_options(config) -> dict[str, Any]:
  """make_train_step's Sophia arguments from the config (empty for other optimizers)."""
  estimator = HESSIAN_ESTIMATORS.get(config.optim.name, '')
  if not estimator:
    return {}
  return {'hessian_estimator': estimator, 'hessian_probe': config.optim.hessian_probe,
          'hessian_rows': config.optim.hessian_rows, 'seed': config.seed}


def float_norm(tree) -> jax.Array:
  """The global L2 norm of a tree's floating-point leaves, in float32. A compressed model's
  integer leaves (int8 / int4 stored values) are not trained and are left out: squared in their
  own dtype they overflow (optax.tree.norm gives NaN for an int8 weight of a few hundred
  entries)."""
  leaves = [x.astype(jnp.float32) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return optax.tree.norm(leaves) if leaves else jnp.zeros((), jnp.float32)


def make_train_step(setup: TrainSetup, z_loss: float = 0.0, loss_chunk_size: int = 0,
                    hessian_estimator: str = '', hessian_probe: str = 'rademacher',
                    hessian_rows: int = 0, seed: int = 0,
                    exit_train_cfg=None,
                    forward_losses: Callable | None = None) -> Callable[[State, dict], tuple]:
  """(state, batch of [micro_batches, rows, length]) -> (new state, metrics).

  Gradients of the *summed* token loss are accumulated over micro-batches and divided once by the
  total token count, so accumulation over k micro-batches equals one batch k times larger. A
  non-finite loss or gradient norm leaves params and optimizer state untouched (metric
  'finite' = 0); the trainer decides whether to go on or stop.

  Mixture-of-experts layers add their weighted router losses (moe.summarize's 'loss', a mean per
  token) to the training loss, scaled by the micro-batch's token count to fit the summed form;
  the reported 'loss' stays the cross-entropy, and the router statistics come as moe_* metrics
  (token-weighted over micro-batches).

  forward_losses replaces the plain per-micro-batch loss (distillation's, from
  effjax.compress.training.forward_losses); with setup.trainable only those leaves get gradients.

  With early exits (exit_train_cfg = config.train), the loss is w_final * CE + sum_e w_e * CE_e
  (+ the distillation term), the weights from early_exit.loss_weights at the step; 'loss' stays
  the final layer's cross-entropy and each exit logs exit<l>_loss, exit<l>_accuracy (and
  exit<l>_distill) as token means.
  """
  graphdef, optimizer, schedule = setup.graphdef, setup.optimizer, setup.schedule

  def summed_loss(params, mb, exit_weights=None):
    exit_sums = {}
    if exit_train_cfg is None:
      ce_sum, z_sum, count, moe_stats = (forward_losses or _forward_losses)(
          graphdef, params, mb, z_loss, loss_chunk_size)
      total = ce_sum + z_sum
    else:
      distill = float(exit_train_cfg.exit_distill_weight)
      temperature = float(exit_train_cfg.exit_distill_temperature) if distill else 0.0
      ce_sum, z_sum, count, moe_stats, exit_sums = _forward_losses_with_exits(
          graphdef, params, mb, z_loss, loss_chunk_size, temperature)
      w_exits, w_final = exit_weights
      total = w_final * ce_sum + z_sum + jnp.sum(w_exits * exit_sums['ce'])
      if distill:
        total = total + distill * jnp.sum(exit_sums['kl'])
    moe_sums = {k: v * count for k, v in moe_stats.items()}
    if moe_sums:
      total = total + moe_sums['loss']
    return total, (ce_sum, count, moe_sums, exit_sums)

  grad_fn = jax.value_and_grad(summed_loss, has_aux=True)
  if setup.trainable is not None:  # frozen parameters get no gradient (compress.training)
    grad_fn = compress_training.partial_grad(summed_loss, setup.trainable)
  model_cfg = nnx.merge(graphdef, setup.abstract_state['params']).cfg
  has_moe = any(ff == 'moe' for _, ff in block_kinds(model_cfg))
  moe_keys = moe.summary_keys(model_cfg.moe_num_experts) if has_moe else ()
  exits = early_exit.parse_exit_layers(model_cfg) if exit_train_cfg is not None else ()
  exit_keys = ('ce', 'correct', 'kl') if exits else ()

  def step(state: State, batch: dict[str, jax.Array]):
    params = state['params']
    num_micro = batch['inputs'].shape[0]
    exit_weights = (early_exit.loss_weights(exit_train_cfg, exits, model_cfg.num_layers,
                                            state['step']) if exits else None)
    if num_micro == 1:
      (_, (ce_sum, count, moe_sums, exit_sums)), grads = grad_fn(
          params, jax.tree.map(lambda x: x[0], batch), exit_weights)
    else:
      # Only trainable leaves are accumulated: a frozen leaf (LoRA's base, a teacher) would
      # otherwise carry a float32 accumulator of its full size through the micro-batch loop.
      flags = ([True] * len(jax.tree.leaves(params)) if setup.trainable is None
               else compress_training.trainable_flags(params, setup.trainable))

      def accumulate(carry, mb):
        g_acc, ce_acc, n_acc, moe_acc, exit_acc = carry
        (_, (ce, n, moe_mb, exit_mb)), g = grad_fn(params, mb, exit_weights)
        return ([a + b for a, b in zip(g_acc, compress_training.pick(g, flags))],
                ce_acc + ce, n_acc + n, jax.tree.map(jnp.add, moe_acc, moe_mb),
                jax.tree.map(jnp.add, exit_acc, exit_mb)), None
      zeros = [jnp.zeros(p.shape, jnp.float32) for p in compress_training.pick(params, flags)]
      zero = jnp.zeros((), jnp.float32)
      moe_zeros = {k: zero for k in moe_keys}
      exit_zeros = {k: jnp.zeros((len(exits),), jnp.float32) for k in exit_keys}
      (summed, ce_sum, count, moe_sums, exit_sums), _ = jax.lax.scan(
          accumulate, (zeros, zero, zero, moe_zeros, exit_zeros), batch)
      grads = compress_training.unpick(summed, params, flags, jnp.float32)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    loss = ce_sum / denom
    grad_norm = float_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    # The guard is a select, not a lax.cond: on GPU a conditional reads its predicate back to the
    # host every step (GPT-2 small, batch 64, H200: 125.1 ms a step with the conditional, 122.3 ms
    # with the select, in two separate runs).
    extra = {}
    if hessian_estimator:  # Sophia: the estimate is evaluated only on its refresh steps
      key = jax.random.fold_in(jax.random.key(seed), state['step'])
      estimate_batch = hessian_rows_of(jax.tree.map(lambda x: x[0], batch), hessian_rows,
                                       setup.batch_sharding)
      extra['hessian_fn'] = hessian_fn_for(
          hessian_estimator, graphdef, estimate_batch, key, hessian_probe,
          full_params=None if setup.trainable is None else params)
    updates, opt_state = optimizer.update(grads, state['opt_state'], params, **extra)
    keep_finite = lambda new, old: jnp.where(finite, new, old)
    new_params = jax.tree.map(keep_finite, optax.apply_updates(params, updates), params)
    new_opt_state = jax.tree.map(keep_finite, opt_state, state['opt_state'])
    new_state = {'step': state['step'] + 1, 'params': new_params, 'opt_state': new_opt_state}
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'learning_rate': schedule(state['step']),
               'tokens': count, 'finite': finite.astype(jnp.int32),
               'param_norm': float_norm(new_params)}
    metrics.update({f'moe_{k}': v / denom for k, v in moe_sums.items()})
    for i, layer in enumerate(exits):
      metrics[f'exit{layer}_loss'] = exit_sums['ce'][i] / denom
      metrics[f'exit{layer}_accuracy'] = exit_sums['correct'][i] / denom
      metrics[f'exit{layer}_weight'] = exit_weights[0][i]
      if exit_train_cfg.exit_distill_weight:
        metrics[f'exit{layer}_distill'] = exit_sums['kl'][i] / denom
    if hessian_estimator:
      metrics.update({f'sophia_{k}': v for k, v in sophia.sophia_stats(new_opt_state).items()})
    return new_state, metrics

  return jax.jit(step, in_shardings=(setup.state_shardings, setup.batch_sharding),
                 out_shardings=(setup.state_shardings, None), donate_argnums=(0,))


def make_eval_step(setup: TrainSetup) -> Callable[[Any, dict], dict]:
  """(params, batch of [1, rows, length]) -> summed loss and token count (exact over batches).

  A model with early exits also returns exit<l>_loss_sum per exit (held-out exit losses).
  """
  graphdef = setup.graphdef
  exits = early_exit.parse_exit_layers(nnx.merge(graphdef, setup.abstract_state['params']).cfg)

  def step(params, batch):
    mb = jax.tree.map(lambda x: x[0], batch)
    if exits:
      ce_sum, _, count, _, sums = _forward_losses_with_exits(graphdef, params, mb, 0.0, 0, 0.0)
      out = {f'exit{l}_loss_sum': sums['ce'][i] for i, l in enumerate(exits)}
      return {'loss_sum': ce_sum, 'tokens': count, **out}
    ce_sum, _, count, _ = _forward_losses(graphdef, params, mb, 0.0)
    return {'loss_sum': ce_sum, 'tokens': count}

  return jax.jit(step, in_shardings=(setup.state_shardings['params'], setup.batch_sharding))


def device_batch(setup: TrainSetup, host_batch: dict[str, Any], num_micro: int) -> dict:
  """This host's rows [rows, length] -> global arrays [micro_batches, rows/micro, length]."""
  out = {}
  for key in BATCH_KEYS:
    if key == 'segment_ids' and key not in host_batch:
      continue  # rows that are single documents: plain causal attention
    x = host_batch[key]
    rows = x.shape[0]
    if rows % num_micro:
      raise ValueError(f'{rows} rows per host are not divisible into {num_micro} micro-batches')
    local = x.reshape(num_micro, rows // num_micro, *x.shape[1:])
    out[key] = jax.make_array_from_process_local_data(setup.batch_sharding, local)
  return out

