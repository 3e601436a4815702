"""The optimizer from the config: a registry of optax transformations, schedules and masks.

Every optimizer is wrapped the same way: global-norm clipping first, then the update rule with the
learning-rate schedule, weight decay masked off norms, biases and (optionally) embeddings, then
per-parameter-group learning-rate multipliers. `optim.name` is a registered rule (adamw, lion,
adafactor, sophia_g, sophia_h) or `contrib:<name>` for any optimizer in optax.contrib that takes
the learning rate (schedule) as its first argument, with its own defaults otherwise.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

import jax
import optax

from effjax.optim import sophia
from effjax.registry import Registry

OPTIMIZERS = Registry('optimizer')
SCHEDULES = ('cosine', 'linear', 'constant', 'wsd')
CONTRIB_PREFIX = 'contrib:'


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then decay to min_lr_ratio * peak at total_steps."""
  peak, warmup = optim_cfg.learning_rate, optim_cfg.warmup_steps
  end = peak * optim_cfg.min_lr_ratio
  decay_steps = max(total_steps - warmup, 1)
  if optim_cfg.schedule == 'cosine':
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim_cfg.min_lr_ratio)
  elif optim_cfg.schedule == 'linear':
    after = optax.linear_schedule(peak, end, decay_steps)
  elif optim_cfg.schedule == 'constant':
    after = optax.constant_schedule(peak)
  elif optim_cfg.schedule == 'wsd':
    # Warmup-stable-decay: hold the peak, then decay linearly to the end over the last
    # decay_fraction of the run (so a run can be branched into a cooldown from any stable step).
    decay = max(int(round(optim_cfg.decay_fraction * decay_steps)), 1)
    stable = max(decay_steps - decay, 0)
    after = optax.join_schedules([optax.constant_schedule(peak),
                                  optax.linear_schedule(peak, end, decay)], [stable])
  else:
    raise ValueError(f'optim.schedule={optim_cfg.schedule!r}; allowed: {", ".join(SCHEDULES)}')
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def _path_keys(path) -> list[str]:
  """A parameter's path as names, without the trailing 'value' of an nnx Variable's pytree."""
  keys = [str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path]
  return keys[:-1] if keys and keys[-1] == 'value' else keys


def weight_decay_mask(params: Any, decay_embeddings: bool = True,
                      no_decay: tuple[str, ...] = ()) -> Any:
  """True where decay applies: matrices, not norm scales or biases (or embeddings if disabled),
  nor a state-space layer's dynamics (a_log, d_skip: Mamba trains them without decay), nor any
  parameter whose path contains a name listed in no_decay (e.g. 'mixer')."""
  def decays(path, _):
    keys = _path_keys(path)
    if keys and (keys[-1] in ('scale', 'bias', 'a_log', 'd_skip') or keys[-1].endswith('_bias')):
      return False
    if not decay_embeddings and keys and keys[-1] in ('embedding', 'unembedding'):
      return False
    return not any(k in no_decay for k in keys)
  return jax.tree_util.tree_map_with_path(decays, params)


def parse_multipliers(spec: str) -> dict[str, float]:
  """'embedding=0.1, mixer=0.5' -> {'embedding': 0.1, 'mixer': 0.5}; '' -> {}."""
  out = {}
  for item in filter(None, (part.strip() for part in spec.split(','))):
    name, sep, value = item.partition('=')
    try:
      if not sep or not name.strip():
        raise ValueError
      out[name.strip()] = float(value)
    except ValueError:
      raise ValueError(f'optim.lr_multipliers={spec!r}: expected NAME=FACTOR pairs separated by '
                       f'commas, e.g. "embedding=0.1,mixer=0.5"') from None
  return out


def scale_by_parameter_group(multipliers: dict[str, float]) -> optax.GradientTransformation:
  """Multiplies each parameter's update by the factor of the first listed name in its path.

  Applied after the rule, so it scales the learning rate of that group (and with decoupled weight
  decay, the decay step too, as a per-group learning rate does).
  """
  def factor(path) -> float:
    for key in _path_keys(path):
      if key in multipliers:
        return multipliers[key]
    return 1.0

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(lambda p, u: u * factor(p) if factor(p) != 1.0 else u,
                                            updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


@OPTIMIZERS.register('adamw')
def _adamw(optim_cfg, schedule: optax.Schedule, mask: Callable) -> optax.GradientTransformation:
  return optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                     weight_decay=optim_cfg.weight_decay, mask=mask)


@OPTIMIZERS.register('lion')
def _lion(optim_cfg, schedule: optax.Schedule, mask: Callable) -> optax.GradientTransformation:
  return optax.lion(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2,
                    weight_decay=optim_cfg.weight_decay, mask=mask)


@OPTIMIZERS.register('adafactor')
def _adafactor(optim_cfg, schedule: optax.Schedule, mask: Callable) -> optax.GradientTransformation:
  # Factored second moments and relative (parameter-RMS-scaled) steps with the paper's update
  # clipping; b1 > 0 adds a first moment. optax applies Adafactor's weight decay after the
  # learning-rate scaling, so it is given as weight_decay * lr(step): the same decoupled decay
  # as adamw and lion (a bare 0.1 there would shrink the weights by 10% every step).
  decay = None
  if optim_cfg.weight_decay:
    decay = lambda step: optim_cfg.weight_decay * schedule(step)
  return optax.adafactor(schedule, momentum=optim_cfg.b1 or None, weight_decay_rate=decay,
                         weight_decay_mask=mask)


def _sophia(optim_cfg, schedule, mask):
  return sophia.sophia(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, rho=optim_cfg.rho,
                       weight_decay=optim_cfg.weight_decay, weight_decay_mask=mask,
                       update_interval=optim_cfg.hessian_interval)


OPTIMIZERS.register('sophia_g')(_sophia)  # Gauss-Newton-Bartlett estimate (the train step's)
OPTIMIZERS.register('sophia_h')(_sophia)  # Hutchinson estimate
HESSIAN_ESTIMATORS = {'sophia_g': 'gnb', 'sophia_h': 'hutchinson'}


def optimizer_names() -> list[str]:
  return sorted(OPTIMIZERS) + [f'{CONTRIB_PREFIX}<name in optax.contrib>']


def check_name(name: str) -> None:
  """ValueError naming what exists when optim.name is neither registered nor in optax.contrib."""
  if name in OPTIMIZERS:
    return
  if name.startswith(CONTRIB_PREFIX):
    member = name[len(CONTRIB_PREFIX):]
    from optax import contrib
    if callable(getattr(contrib, member, None)) and not member.startswith('_'):
      return
    available = sorted(n for n in dir(contrib) if not n.startswith('_') and n.islower()
                       and callable(getattr(contrib, n)))
    raise ValueError(f'optim.name={name!r}: optax.contrib has no {member!r}; it has '
                     f'{", ".join(available)}')
  close = difflib.get_close_matches(name, list(OPTIMIZERS), n=1)
  hint = f' (did you mean {close[0]!r}?)' if close else ''
  raise ValueError(f'optim.name={name!r}{hint}: allowed values are {", ".join(optimizer_names())}')


def make_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation,
                                                          optax.Schedule]:
  check_name(optim_cfg.name)
  schedule = learning_rate_schedule(optim_cfg, total_steps)
  no_decay = tuple(n.strip() for n in optim_cfg.no_decay.split(',') if n.strip())
  mask = lambda params: weight_decay_mask(params, optim_cfg.decay_embeddings, no_decay)
  if optim_cfg.name.startswith(CONTRIB_PREFIX):
    from optax import contrib
    rule = getattr(contrib, optim_cfg.name[len(CONTRIB_PREFIX):])(schedule)
  else:
    rule = OPTIMIZERS.get(optim_cfg.name)(optim_cfg, schedule, mask)
  parts = [optax.clip_by_global_norm(optim_cfg.clip_norm)] if optim_cfg.clip_norm > 0 else []
  parts.append(rule)
  multipliers = parse_multipliers(optim_cfg.lr_multipliers)
  if multipliers:
    parts.append(scale_by_parameter_group(multipliers))
  return optax.chain(*parts), schedule
