"""The device mesh from the config: axes data, fsdp, tensor, expert, sequence."""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ('data', 'fsdp', 'tensor', 'expert', 'sequence')


def mesh_shape(mesh_cfg: Any, num_devices: int) -> dict[str, int]:
  """Resolve the one optional -1 axis; raise ValueError naming the field when sizes do not fit."""
  sizes = {a: int(mesh_cfg[a]) for a in AXES}
  free = [a for a, s in sizes.items() if s == -1]
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if bad:
    raise ValueError(f'mesh.{bad[0]}={sizes[bad[0]]}: axis sizes must be positive, or -1 for one '
                     'axis that takes the remaining devices')
  if len(free) > 1:
    raise ValueError(f'mesh: only one axis may be -1, got {free}')
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(
          f'mesh.{free[0]}=-1: the other axes multiply to {fixed}, which does not divide the '
          f'{num_devices} devices')
    sizes[free[0]] = num_devices // fixed
  total = math.prod(sizes.values())
  if total != num_devices:
    shown = 'x'.join(f'{a}={s}' for a, s in sizes.items())
    raise ValueError(f'mesh: {shown} is {total} devices but {num_devices} are present; make the '
                     'product equal the device count or set one axis to -1')
  return sizes


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh with Auto axis types (plain indexing of sharded arrays keeps working)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in AXES)
  try:
    # Topology-aware placement on real accelerators (keeps tensor-parallel groups on fast links).
    from jax.experimental import mesh_utils
    dev_array = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except Exception:  # CPU devices and odd shapes: plain order is as good as any
    dev_array = np.asarray(devices).reshape(shape)
  return Mesh(dev_array, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))
