"""The optimizer from the config: a registry of optax transformations, schedules and masks.

Every optimizer is wrapped the same way: global-norm clipping first, then the update rule with the
learning-rate schedule, weight decay masked off norms, biases and (optionally) embeddings.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from effjax.registry import Registry

OPTIMIZERS = Registry('optimizer')
SCHEDULES = ('cosine', 'linear', 'constant')


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
  else:
    raise ValueError(f'optim.schedule={optim_cfg.schedule!r}; allowed: {", ".join(SCHEDULES)}')
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def weight_decay_mask(params: Any, decay_embeddings: bool = True) -> Any:
  """True where decay applies: matrices, not norm scales or biases (or embeddings if disabled)."""
  def decays(path, _):
    keys = [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]
    if keys and keys[-1] in ('scale', 'bias'):
      return False
    if not decay_embeddings and keys and keys[-1] in ('embedding', 'unembedding'):
      return False
    return True
  return jax.tree_util.tree_map_with_path(decays, params)


@OPTIMIZERS.register('adamw')
def _adamw(optim_cfg, schedule: optax.Schedule, mask: Callable) -> optax.GradientTransformation:
  return optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                     weight_decay=optim_cfg.weight_decay, mask=mask)


def make_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation,
                                                          optax.Schedule]:
  schedule = learning_rate_schedule(optim_cfg, total_steps)
  mask = lambda params: weight_decay_mask(params, optim_cfg.decay_embeddings)
  rule = OPTIMIZERS.get(optim_cfg.name)(optim_cfg, schedule, mask)
  parts = [optax.clip_by_global_norm(optim_cfg.clip_norm)] if optim_cfg.clip_norm > 0 else []
  return optax.chain(*parts, rule), schedule
