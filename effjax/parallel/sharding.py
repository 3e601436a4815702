"""Logical axis names -> mesh axes.

Parameters and the main activations carry logical names ('embed', 'mlp', 'act_batch', ...); the
config's `sharding_rules` maps each name to mesh axes. Models never name a mesh axis, so a new
parallel layout is a config change. The rules live in flax's logical-axis-rules context, which also
drives `nnx.get_partition_spec` for parameters.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence

import jax
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import NamedSharding, PartitionSpec as P

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]


def rules_from_config(rules_cfg: Mapping[str, Any]) -> Rules:
  """ConfigDict {logical: mesh axes} -> the tuple-of-pairs form flax expects."""
  out = []
  for name, axes in dict(rules_cfg).items():
    if isinstance(axes, list):
      axes = tuple(axes)
    if isinstance(axes, tuple) and len(axes) == 1:
      axes = axes[0]
    out.append((name, axes if axes != () else None))
  return tuple(out)


@contextlib.contextmanager
def axis_rules(rules: Rules) -> Iterator[None]:
  with flax_spmd.logical_axis_rules(rules):
    yield


def current_rules() -> Rules:
  return tuple(flax_spmd.get_logical_axis_rules())


def logical_to_spec(names: Sequence[str | None], rules: Rules | None = None) -> P:
  """PartitionSpec for a tuple of logical names; a mesh axis is used at most once (first wins)."""
  table = dict(current_rules() if rules is None else rules)
  used: set[str] = set()
  spec = []
  for name in names:
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise KeyError(f'logical axis {name!r} has no entry in sharding_rules (known: {sorted(table)})')
    axes = table[name]
    axes_t = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes_t = tuple(a for a in axes_t if a not in used)
    used.update(axes_t)
    spec.append(None if not axes_t else axes_t[0] if len(axes_t) == 1 else axes_t)
  return P(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names; a no-op outside a mesh context or without rules."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or not current_rules():
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def param_specs(tree: Any) -> Any:
  """Tree holding nnx Variables (abstract or concrete) -> the same tree with mesh PartitionSpecs.

  Variables stay in the tree (holding their spec as value), so the result lines up leaf for leaf
  with the state and with optax trees that mirror it; any other array leaf is replicated.
  """
  def spec_of(x):
    if isinstance(x, nnx.Variable):
      if not hasattr(x.get_value(), 'shape'):
        return x  # a placeholder without arrays (optax.MaskedNode of a frozen parameter)
      names = x.get_metadata().get('out_sharding')
      return x.replace(logical_to_spec(names) if names else P(*([None] * len(x.shape))))
    return P(*([None] * len(getattr(x, 'shape', ()))))
  return jax.tree.map(spec_of, tree, is_leaf=lambda v: isinstance(v, nnx.Variable))


def check_divisible(shape_tree: Any, spec_tree: Any, mesh: jax.sharding.Mesh) -> None:
  """Raise one clear error for the first parameter whose dimension a mesh axis does not divide."""
  leaves = jax.tree_util.tree_flatten_with_path(shape_tree)[0]
  specs = jax.tree.leaves(spec_tree, is_leaf=lambda x: isinstance(x, P))
  for (path, leaf), spec in zip(leaves, specs):
    for dim, axes in zip(leaf.shape, spec):
      axes_t = (axes,) if isinstance(axes, str) else tuple(axes or ())
      size = 1
      for a in axes_t:
        size *= mesh.shape[a]
      if dim % size:
        name = jax.tree_util.keystr(path)
        raise ValueError(
            f'parameter {name} of shape {tuple(leaf.shape)} cannot be sharded as {spec}: dimension '
            f'{dim} is not divisible by mesh axes {axes_t} of size {size}; change the mesh or '
            'sharding_rules')


def named(mesh: jax.sharding.Mesh, spec_tree: Any) -> Any:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), spec_tree,
                      is_leaf=lambda x: isinstance(x, P))


def map_per_device(fn, args: Sequence[Any], names: Sequence[Sequence[str | None] | None],
                   out_names: Any) -> Any:
  """fn(*args) run per device under the current mesh, for ops XLA cannot partition (Pallas).

  Each array of `args` is split along the mesh axes its logical `names` map to (None entries of
  `names` mark arguments passed whole: None values or replicated arrays); `out_names` gives the
  outputs' names, a tuple of names per output or one tuple for a single output. A logical name's
  split is decided once, by the first argument that carries it: mesh axes whose sizes do not
  divide that dimension are left out (a one-sequence generation batch is then replicated rather
  than refused; of several axes, the longest leading run that divides it is kept). Outside a
  mesh, or without rules, fn is called directly.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or not current_rules():
    return fn(*args)
  chosen: dict[str, Any] = {}
  for arg, arg_names in zip(args, names):
    if arg is None or arg_names is None:
      continue
    for dim, name, axes in zip(arg.shape, arg_names, logical_to_spec(arg_names)):
      if name is None or name in chosen:
        continue
      axes_t = tuple(a for a in ((axes,) if isinstance(axes, str) else tuple(axes or ()))
                     if mesh.shape[a] > 1)
      kept, size = [], 1
      for a in axes_t:
        if dim % (size * mesh.shape[a]):
          break
        kept.append(a)
        size *= mesh.shape[a]
      chosen[name] = None if not kept else kept[0] if len(kept) == 1 else tuple(kept)

  def spec(arg_names):
    return P(*(None if n is None else chosen.get(n) for n in arg_names))

  in_specs = tuple(P() if arg is None or n is None else spec(n) for arg, n in zip(args, names))
  single = bool(out_names) and all(isinstance(n, str) or n is None for n in out_names)
  out_specs = spec(out_names) if single else tuple(spec(n) for n in out_names)
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)(*args)
