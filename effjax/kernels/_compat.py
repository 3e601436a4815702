"""What differs between the JAX versions effjax supports, for the kernels.

`out_struct(shape, dtype, *operands)`: the `out_shape` of a `pallas_call`. Inside `jax.shard_map`
with `check_vma=True` (its default) Pallas needs to know over which manual mesh axes each output
varies; an output of a kernel varies wherever any of its operands does, so the struct carries the
union of the operands' varying axes (Pallas refuses a struct that leaves it unset there, even
when nothing varies, as under a mesh of one device). Outside shard_map Pallas ignores it. JAX 0.10 and 0.11 spell this `manual_axis_type=jax.sharding.ManualAxisType(varying=)`;
earlier releases took `vma=` (a frozenset of axis names).

`partitioned_mesh()`: whether a mesh in context has an automatically partitioned axis of more
than one device, where XLA cannot partition a Pallas call ('auto' backends then take XLA).
"""

from __future__ import annotations

import inspect

import jax

_FIELD = ('manual_axis_type'
          if 'manual_axis_type' in inspect.signature(jax.ShapeDtypeStruct).parameters else 'vma')


def varying_axes(x) -> frozenset[str]:
  """The manual mesh axes over which x varies inside shard_map (empty outside)."""
  aval = jax.typeof(x)
  mat = getattr(aval, 'manual_axis_type', None)
  if mat is not None:
    return frozenset(getattr(mat, 'varying', ()) or ())
  return frozenset(getattr(aval, 'vma', ()) or ())


def out_struct(shape, dtype, *operands) -> jax.ShapeDtypeStruct:
  """A kernel output's ShapeDtypeStruct, varying over every axis any operand varies over."""
  axes = frozenset().union(*(varying_axes(x) for x in operands))
  if _FIELD == 'manual_axis_type':
    return jax.ShapeDtypeStruct(shape, dtype,
                                manual_axis_type=jax.sharding.ManualAxisType(varying=axes))
  return jax.ShapeDtypeStruct(shape, dtype, vma=axes)


def sum_to_varying(grad: jax.Array, primal) -> jax.Array:
  """A custom VJP's cotangent for `primal`, summed over the mesh axes along which it varies and
  the primal does not (inside shard_map a kernel's gradient of a replicated weight is per device;
  autodiff of ordinary ops inserts this psum itself)."""
  extra = tuple(sorted(varying_axes(grad) - varying_axes(primal)))
  return jax.lax.psum(grad, extra) if extra else grad


def partitioned_mesh() -> bool:
  """A mesh in context with an automatically partitioned axis of more than one device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return False
  return any(mesh.shape[a] > 1 for a in mesh.axis_names if a not in mesh.manual_axes)
