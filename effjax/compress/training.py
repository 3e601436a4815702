"""How a compressed model trains: its structure, frozen parameters, masks and distillation loss.

The train step (effjax/train/step.py) asks this module four things, all derived from
config.compress:

- `build_model(config, rngs)`: the LM with its projections swapped (effjax.compress.weights),
  and the teacher attached for distillation.
- `wrap_optimizer(config, optimizer)`: for LoRA and quantized models, an
  `optax.multi_transform` whose 'frozen' part is `optax.set_to_zero()`, so the optimizer state
  holds moments only for what trains (LoRA: only the adapters); for pruning, `keep_pruned`.
- `trainable`: (path names, leaf) -> bool, or None when everything trains. The step then
  differentiates only the trainable leaves (`partial_grad`) and, with gradient accumulation,
  accumulates only theirs (`pick` / `unpick`): a frozen base weight gets no gradient buffer and
  no accumulator at all, which is where LoRA's memory saving comes from.
- `forward_losses(config)`: the distillation loss in place of the plain one (None otherwise).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from effjax.compress import distill, prune
from effjax.compress import weights as w_lib
from effjax.models.lm import LM


def _method(config) -> str:
  return config.compress.method if 'compress' in config else ''


def build_model(config, rngs: nnx.Rngs) -> LM:
  """LM(config.model) in the structure config.compress describes."""
  model = LM(config.model, rngs=rngs)
  method = _method(config)
  if method in w_lib.STRUCTURAL:
    model = w_lib.restructure(model, config)
  elif method == 'distill':
    model = distill.attach_teacher(model, config)
  return model


def _path_names(path) -> tuple[str, ...]:
  names = [str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path]
  return tuple(names[:-1] if names and names[-1] == 'value' else names)


def trainable(config) -> Callable[[tuple, Any], bool] | None:
  method = _method(config)
  if method == 'distill':
    return lambda names, leaf: 'teacher' not in names
  return w_lib.trainable_fn(config) if method else None


def labels(config) -> Callable[[Any], Any]:
  fn = trainable(config)
  return lambda params: jax.tree_util.tree_map_with_path(
      lambda p, leaf: 'train' if fn(_path_names(p), leaf) else 'frozen', params)


def wrap_optimizer(config, optimizer: optax.GradientTransformation):
  """(optimizer, trainable) for the compressed model of config (unchanged when not compressed)."""
  method = _method(config)
  if method in w_lib.PRUNE_METHODS:
    optimizer = prune.keep_pruned(optimizer, w_lib.target_names(config.compress))
  fn = trainable(config)
  if fn is not None:
    optimizer = optax.multi_transform({'train': optimizer, 'frozen': optax.set_to_zero()},
                                      labels(config))
  return optimizer, fn


def partial_grad(loss_fn: Callable, trainable_fn: Callable) -> Callable:
  """jax.value_and_grad(loss_fn, has_aux=True) over the trainable leaves of its first argument.

  Frozen leaves enter under stop_gradient and get zeros in the returned gradient tree (constants
  that XLA folds away), so the tree has the parameters' structure for the optimizer.
  """
  def grad_fn(params, *args):
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    flags = [bool(trainable_fn(_path_names(p), leaf)) for p, leaf in flat]
    leaves = [leaf for _, leaf in flat]
    train = [leaf for leaf, f in zip(leaves, flags) if f]

    def on_trainable(train_leaves):
      it = iter(train_leaves)
      full = [next(it) if f else jax.lax.stop_gradient(leaf) for leaf, f in zip(leaves, flags)]
      return loss_fn(jax.tree.unflatten(treedef, full), *args)

    out, grads = jax.value_and_grad(on_trainable, has_aux=True)(train)
    it = iter(grads)
    full = [next(it) if f else jnp.zeros(leaf.shape, leaf.dtype) for leaf, f in zip(leaves, flags)]
    return out, jax.tree.unflatten(treedef, full)

  return grad_fn


def trainable_flags(params, trainable_fn: Callable) -> list[bool]:
  """Whether each leaf of params (tree_flatten order) trains."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return [bool(trainable_fn(_path_names(p), leaf)) for p, leaf in flat]


def pick(tree, flags: list[bool]) -> list:
  """The leaves of tree whose flag is set (the trainable ones), in tree_flatten order."""
  return [leaf for leaf, f in zip(jax.tree.leaves(tree), flags) if f]


def unpick(leaves: list, like, flags: list[bool], dtype=None):
  """A tree shaped like `like`: the picked leaves back in place, zeros (constants) elsewhere."""
  it = iter(leaves)
  full = [next(it) if f else jnp.zeros(x.shape, dtype or x.dtype)
          for x, f in zip(jax.tree.leaves(like), flags)]
  return jax.tree.unflatten(jax.tree.structure(like), full)


def forward_losses(config):
  """The step's per-micro-batch loss for distillation; None for every other method."""
  if _method(config) == 'distill':
    return distill.forward_losses_fn(config.compress)
  return None
