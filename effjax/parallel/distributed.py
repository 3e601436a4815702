"""Multi-host start-up: jax.distributed.initialize from the config, flags or the environment.

Each value is taken from the first place that has it:

  coordinator   config.distributed.coordinator_address, else what JAX reads by itself:
                $JAX_COORDINATOR_ADDRESS, or the cluster (Cloud TPU, SLURM, Open MPI, Kubernetes)
  process count config.distributed.num_processes, else $EFFJAX_NUM_PROCESSES, else the cluster
  process id    config.distributed.process_id, else $EFFJAX_PROCESS_ID, else the cluster

JAX has no cluster-neutral variables for the process count and id (only SLURM_NTASKS, OMPI_* and
the like, which its cluster detection reads), hence the two EFFJAX_* ones; for the address it has
one, so there is no EFFJAX_ duplicate. On Cloud TPU, SLURM and Open MPI nothing needs to be set
beyond `distributed.initialize=True`.
"""

from __future__ import annotations

import os

from absl import logging
import jax

_ENV_NUM_PROCESSES = 'EFFJAX_NUM_PROCESSES'
_ENV_PROCESS_ID = 'EFFJAX_PROCESS_ID'


def _setting(dist_cfg, field: str, env: str, unset: int) -> tuple[int | None, str]:
  """(value or None, where it came from) for an integer field that may fall back to $env."""
  value = int(dist_cfg[field])
  if value != unset:
    return value, f'distributed.{field}'
  text = os.environ.get(env, '').strip()
  if not text:
    return None, f'distributed.{field}'
  try:
    return int(text), f'${env}'
  except ValueError:
    raise ValueError(f'${env}={text!r}: must be an integer (or unset)') from None


def resolve(dist_cfg) -> dict | None:
  """The keyword arguments for jax.distributed.initialize, or None when it should not be called.

  Asking for more than one process implies initialising: two processes that each trained alone
  would overwrite each other's checkpoints in the shared workdir. Values left out are for JAX to
  find (see the module docstring).
  """
  num, num_name = _setting(dist_cfg, 'num_processes', _ENV_NUM_PROCESSES, unset=0)
  pid, pid_name = _setting(dist_cfg, 'process_id', _ENV_PROCESS_ID, unset=-1)
  if num is not None and num < 1:
    raise ValueError(f'{num_name}={num}: must be a positive number of processes (0 in the config '
                     f'means unset)')
  if pid is not None and pid < 0:
    raise ValueError(f'{pid_name}={pid}: must be a process index >= 0 (-1 in the config means '
                     f'unset)')
  if num is not None and pid is not None and pid >= num:
    raise ValueError(f'{pid_name}={pid} must be less than {num_name}={num} (process ids run 0 '
                     f'.. {num - 1})')
  if not dist_cfg.initialize and not (num or 0) > 1:
    return None
  kwargs = {}
  if dist_cfg.coordinator_address:
    kwargs['coordinator_address'] = dist_cfg.coordinator_address
  if num is not None:
    kwargs['num_processes'] = num
  if pid is not None:
    kwargs['process_id'] = pid
  return kwargs


def maybe_initialize(dist_cfg) -> None:
  """Calls jax.distributed.initialize when the config or environment asks for it.

  Must run before anything touches a JAX backend. Raises ValueError (one line, naming the fields)
  when the settings cannot describe a run.
  """
  kwargs = resolve(dist_cfg)
  if kwargs is None:
    return
  # Cross-process collectives of CPU computations need an implementation; gloo is JAX's current
  # default, but older versions (and JAX_CPU_COLLECTIVES_IMPLEMENTATION=none) leave them off, and
  # then every sharded step of a multi-process CPU run fails at its first all-reduce.
  if getattr(jax.config, 'jax_cpu_collectives_implementation', 'gloo') in (None, 'none'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as e:  # something JAX could neither read from kwargs nor detect
    detail = ' '.join(str(e).split())
    raise ValueError(
        f'jax.distributed.initialize: {detail} Set distributed.coordinator_address (host:port of '
        f'process 0, or $JAX_COORDINATOR_ADDRESS), distributed.num_processes '
        f'(${_ENV_NUM_PROCESSES}) and distributed.process_id (${_ENV_PROCESS_ID}); only Cloud '
        f'TPU, SLURM, Open MPI and Kubernetes provide them by themselves.') from None
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
