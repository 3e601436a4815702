"""Knowledge distillation: a student trained on the usual loss plus the teacher's soft targets.

    loss = CE(student, labels) + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))
           [+ hidden_weight * mean over dims of (h_student - h_teacher)^2]

summed over tokens like the cross-entropy (the train step divides by the token count). T^2 keeps
the soft-target gradients on the same scale whatever the temperature (Hinton et al., 2015). The
hidden term matches the final-normed hidden states (the student's width must equal the
teacher's).

The teacher rides inside the student's parameter tree as a frozen submodule (`teacher`): the
normal trainer, checkpoints and shardings carry it, its forward runs in the same jitted step
under stop_gradient, and the optimizer holds no state for it (effjax.compress.training).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from effjax.models.lm import LM, head_logits


def kl_sum(student_logits: jax.Array, teacher_logits: jax.Array, weights: jax.Array,
           temperature: float) -> jax.Array:
  """sum_tokens weights * T^2 * KL(p_teacher^T || p_student^T), float32."""
  t = float(temperature)
  log_p_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
  log_p_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  return t * t * jnp.sum(kl * weights.astype(jnp.float32))


def hidden_sum(student_h: jax.Array, teacher_h: jax.Array, weights: jax.Array) -> jax.Array:
  """sum_tokens weights * mean_dims (h_s - h_t)^2."""
  diff = student_h.astype(jnp.float32) - teacher_h.astype(jnp.float32)
  return jnp.sum(jnp.mean(diff * diff, axis=-1) * weights.astype(jnp.float32))


def teacher_model_config(compress_cfg) -> ml_collections.ConfigDict:
  if not compress_cfg.teacher_model:
    raise ValueError("compress.method='distill' needs compress.teacher_model (the teacher's model "
                     'section as JSON; --mode=compress records it)')
  return ml_collections.ConfigDict(json.loads(compress_cfg.teacher_model))


def attach_teacher(model: LM, config) -> LM:
  """The student with an (untrained) teacher LM attached as `model.teacher`."""
  teacher_cfg = teacher_model_config(config.compress)
  if teacher_cfg.vocab_size != config.model.vocab_size:
    raise ValueError(f'distillation: the teacher vocabulary ({teacher_cfg.vocab_size}) differs '
                     f'from the student model.vocab_size={config.model.vocab_size}')
  if config.compress.distill_hidden_weight and teacher_cfg.d_model != config.model.d_model:
    raise ValueError(f'compress.distill_hidden_weight={config.compress.distill_hidden_weight}: '
                     f'hidden-state matching needs the student width ({config.model.d_model}) to '
                     f'equal the teacher width ({teacher_cfg.d_model})')
  model.teacher = LM(teacher_cfg, rngs=nnx.Rngs(config.seed + 7))
  return model


def forward_losses_fn(compress_cfg):
  """A step.py `_forward_losses` stand-in: (ce_sum, z_sum + distillation sums, count, stats)."""
  from effjax.train.step import token_losses
  temperature = float(compress_cfg.distill_temperature)
  weight = float(compress_cfg.distill_weight)
  hidden_weight = float(compress_cfg.distill_hidden_weight)

  def forward(graphdef, params, mb, z_loss, loss_chunk_size=0):
    del loss_chunk_size  # the soft targets need the full logits
    model = nnx.merge(graphdef, params)
    args = (mb['inputs'], mb['positions'], mb.get('segment_ids'))
    x, stats = model.features_and_stats(*args)
    logits = head_logits(x, model.head_matrix(), model.precision.output)
    teacher = model.teacher
    x_t, _ = teacher.features_and_stats(*args)
    logits_t = head_logits(x_t, teacher.head_matrix(), teacher.precision.output)
    x_t, logits_t = jax.lax.stop_gradient((x_t, logits_t))
    ce_sum, z_sum, count = token_losses(logits, mb['targets'], mb['weights'], z_loss)
    extra = weight * kl_sum(logits, logits_t, mb['weights'], temperature)
    if hidden_weight:
      extra = extra + hidden_weight * hidden_sum(x, x_t, mb['weights'])
    return ce_sum, z_sum + extra, count, stats

  return forward
