"""Pruning: magnitude masks (per layer or global), 2:4 structured masks, and masks that optimizer
updates never break.

A pruned model keeps the dense parameter tree (zeros where pruned), so every mode loads it as it
loads any model. While it is fine-tuned, `keep_pruned` (an optax wrapper) holds the masks in the
optimizer state, taken at initialisation from the weights that are exactly zero, and multiplies
the gradients going in and the updates coming out (weight decay included) by them: a pruned
entry gets no moment, no update and stays exactly 0.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from effjax.compress import weights as w_lib


def _grouped(w: jax.Array, layout: w_lib.Layout) -> tuple[jax.Array, tuple[int, ...]]:
  """w as [batch, inputs, outputs] (one matrix per layer / expert) and the original shape."""
  nb = layout.batch
  batch = int(np.prod(w.shape[:nb], dtype=np.int64))
  inputs = int(np.prod(w.shape[nb:nb + layout.inputs], dtype=np.int64))
  return w.reshape(batch, inputs, -1), w.shape


def magnitude_masks(weights: dict[str, tuple[jax.Array, w_lib.Layout]], sparsity: float,
                    scope: str) -> dict[str, jax.Array]:
  """Keep the largest |w|: the top (1 - sparsity) of each layer's matrix ('layer') or of all
  targeted weights together ('global'). Returns bool masks shaped like the weights."""
  if not 0.0 <= sparsity < 1.0:
    raise ValueError(f'compress.prune_sparsity={sparsity}: must be in [0, 1)')
  if scope == 'global':
    flat = jnp.concatenate([jnp.abs(w.astype(jnp.float32)).ravel() for w, _ in weights.values()])
    k = int(round(sparsity * flat.size))
    threshold = jnp.sort(flat)[k - 1] if k else -1.0
    return {key: jnp.abs(w.astype(jnp.float32)) > threshold for key, (w, _) in weights.items()}
  masks = {}
  for key, (w, layout) in weights.items():
    g, shape = _grouped(jnp.abs(w.astype(jnp.float32)), layout)
    per = g.reshape(g.shape[0], -1)
    k = int(round(sparsity * per.shape[1]))
    threshold = jnp.sort(per, axis=1)[:, k - 1:k] if k else jnp.full((per.shape[0], 1), -1.0)
    masks[key] = (per > threshold).reshape(shape)
  return masks


def two_four_mask(w: jax.Array, layout: w_lib.Layout) -> jax.Array:
  """2:4 structured sparsity: in every 4 consecutive input entries of an output channel the 2
  largest |w| are kept (what sparse tensor cores multiply). The input size must divide by 4."""
  g, shape = _grouped(jnp.abs(w.astype(jnp.float32)), layout)
  b, n_in, n_out = g.shape
  if n_in % 4:
    raise ValueError(f'2:4 pruning needs the input size ({n_in}, axes {layout.names}) to be a '
                     'multiple of 4')
  quads = g.reshape(b, n_in // 4, 4, n_out)
  rank = jnp.argsort(jnp.argsort(-quads, axis=2, stable=True), axis=2)  # 0 = largest of the 4
  return (rank < 2).reshape(shape)


def prune_model(model: nnx.Module, compress_cfg, method: str) -> dict[str, float]:
  """Zero the pruned entries of the target weights in place; returns each weight's sparsity."""
  found = w_lib.find_targets(model, w_lib.target_names(compress_cfg))
  weights = {}
  for path, module, name in found:
    param = vars(module)[name]
    weights[w_lib.path_key(path + (name,))] = (param[...], w_lib.layout_of(w_lib._names(param)))
  if method == '2:4':
    masks = {k: two_four_mask(w, layout) for k, (w, layout) in weights.items()}
  else:
    masks = magnitude_masks(weights, compress_cfg.prune_sparsity, compress_cfg.prune_scope)
  sparsity = {}
  for path, module, name in found:
    key = w_lib.path_key(path + (name,))
    param = vars(module)[name]
    param[...] = jnp.where(masks[key], param[...], 0).astype(param[...].dtype)
    sparsity[key] = float(1.0 - jnp.mean(masks[key].astype(jnp.float32)))
  return sparsity


def _path_names(path) -> tuple[str, ...]:
  names = [str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path]
  return tuple(names[:-1] if names and names[-1] == 'value' else names)


class KeepPrunedState(NamedTuple):
  masks: Any  # {path key: bool Variable shaped like its weight}
  inner: Any


def keep_pruned(inner: optax.GradientTransformation,
                targets: tuple[str, ...]) -> optax.GradientTransformation:
  """`inner` with the zero entries of the named weights (at init) frozen at exactly zero."""
  is_var = lambda x: isinstance(x, nnx.Variable)

  def leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_var)

  def init(params):
    masks = {}
    for path, leaf in leaves(params)[0]:
      names = _path_names(path)
      if names and names[-1] in targets:
        value = leaf.get_value() if is_var(leaf) else leaf
        mask = value != 0
        masks['.'.join(names)] = leaf.replace(mask) if is_var(leaf) else mask
    return KeepPrunedState(masks, inner.init(params))

  def apply(tree, masks):
    flat, treedef = leaves(tree)
    out = []
    for path, leaf in flat:
      mask = masks.get('.'.join(_path_names(path)))
      if mask is not None:
        mask = mask.get_value() if is_var(mask) else mask
        if is_var(leaf):
          leaf = leaf.replace(leaf.get_value() * mask.astype(leaf.get_value().dtype))
        else:
          leaf = leaf * mask.astype(leaf.dtype)
      out.append(leaf)
    return jax.tree.unflatten(treedef, out)

  def update(updates, state, params=None, **extra):
    updates = apply(updates, state.masks)
    updates, inner_state = inner.update(updates, state.inner, params, **extra)
    return apply(updates, state.masks), KeepPrunedState(state.masks, inner_state)

  return optax.GradientTransformationExtraArgs(init, update)
