"""Multi-host start-up: jax.distributed.initialize from the config, flags or the environment.

On Cloud TPU the coordinator, process count and id are discovered automatically; on GPU clusters
they come from config.distributed (or JAX's own environment variables, e.g. under SLURM).
"""

from __future__ import annotations

from absl import logging
import jax


def maybe_initialize(dist_cfg) -> None:
  if not dist_cfg.initialize:
    return
  kwargs = {}
  if dist_cfg.coordinator_address:
    kwargs['coordinator_address'] = dist_cfg.coordinator_address
  if dist_cfg.num_processes > 0:
    kwargs['num_processes'] = dist_cfg.num_processes
  if dist_cfg.process_id >= 0:
    kwargs['process_id'] = dist_cfg.process_id
  jax.distributed.initialize(**kwargs)
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
