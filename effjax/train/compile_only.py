"""`--mode=compile_only`: compile the train and eval steps for the config's mesh, run nothing.

    python -m effjax.main --config=configs/gpt_1b.py --workdir=DIR --mode=compile_only

Answers "does this config fit, and how is its memory split" before a single parameter exists: the
steps are lowered from `TrainSetup.abstract_state` (ShapeDtypeStructs carrying their shardings)
and abstract batches of [grad_accum_steps, batch_size / grad_accum_steps, seq_len] with the batch
sharding, so nothing is initialised, no data is read and no checkpoint is written. Printed, and
written to DIR/compile_only.json: per-device memory from `compiled.memory_analysis()`, the lowering
and compile times, the devices and mesh, and XLA's FLOP count from `compiled.cost_analysis()`.

Per-device memory, all sizes of one device's program (SPMD: every device runs the same one):

  arguments     the shards of the train state and the batch this device holds
  outputs       the shards of the new state and the metrics
  temporaries   XLA's scratch: activations kept for the backward, gradients, fusion buffers
  aliased       outputs written into a donated argument's buffers (the train state is donated),
                so counted in both arguments and outputs but allocated once
  total         arguments + outputs + temporaries - aliased
  generated code  the executable itself (0 on CPU); not in the total

The total is the step's own footprint; what else is alive at that moment (the eval batches, a
checkpoint being written, the runtime's reserve) comes on top. The eval step reads the same
parameter buffers as the train state, so its arguments are not extra memory.

FLOPs are XLA's count for one device's program. XLA counts the body of a loop once, so with the
layers scanned (and micro-batches accumulated by a scan) it undercounts the step; the model's
analytic count (effjax.train.flops) is printed beside it for that reason.

Other device counts: on CPU, `XLA_FLAGS=--xla_force_host_platform_device_count=N` simulates N
devices, so the sharding of a mesh meant for N accelerators (argument and output sizes, which
depend only on shapes and shardings) can be checked on a laptop. Temporaries, generated code and
FLOPs are those of the backend that compiled, though: XLA's CPU compiler fuses and schedules
differently from the GPU and TPU ones. Compiling for a device kind that is not present (a TPU or
GPU program on a CPU-only install) is not possible with JAX's CPU backend; run this mode on the
target machine for its numbers.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import numpy as np

from effjax.optim.factory import make_optimizer
from effjax.parallel import mesh as mesh_lib
from effjax.parallel import sharding as shd
from effjax.train import flops as flops_lib
from effjax.train import step as step_lib

REPORT_FILE = 'compile_only.json'
TOTAL_FORMULA = 'arguments + outputs + temporaries - aliased'


def abstract_batch(setup: step_lib.TrainSetup, rows: int, seq_len: int,
                   micro_batches: int) -> dict[str, jax.ShapeDtypeStruct]:
  """What step_lib.device_batch makes of `rows` packed rows, as shapes with the batch sharding."""
  if rows % micro_batches:
    raise ValueError(f'{rows} rows are not divisible into {micro_batches} micro-batches')
  shape = (micro_batches, rows // micro_batches, seq_len)
  return {key: jax.ShapeDtypeStruct(shape, np.float32 if key == 'weights' else np.int32,
                                    sharding=setup.batch_sharding)
          for key in step_lib.BATCH_KEYS}


def memory_report(compiled) -> dict[str, int]:
  """Per-device bytes of a compiled step, with the total as TOTAL_FORMULA."""
  stats = compiled.memory_analysis()
  if stats is None:  # a backend without buffer assignment statistics
    return {}
  report = {'argument_bytes': int(stats.argument_size_in_bytes),
            'output_bytes': int(stats.output_size_in_bytes),
            'temp_bytes': int(stats.temp_size_in_bytes),
            'generated_code_bytes': int(stats.generated_code_size_in_bytes),
            'alias_bytes': int(stats.alias_size_in_bytes)}
  report['total_bytes'] = (report['argument_bytes'] + report['output_bytes'] +
                           report['temp_bytes'] - report['alias_bytes'])
  return report


def xla_flops(compiled) -> float | None:
  """XLA's FLOPs for one device's program (loop bodies counted once), or None where unknown."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # not every backend implements it
    return None
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  return float(cost['flops'])


def _compile(jitted, *args) -> tuple[Any, dict[str, Any]]:
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  return compiled, {'lower_seconds': lowered_at - start, 'compile_seconds': done - lowered_at}


def _step_report(compiled, timings: dict, batch: dict, tokens: int, analytic_per_token: float,
                 num_devices: int) -> dict[str, Any]:
  flops = xla_flops(compiled)
  return {
      'batch_shape': list(batch['inputs'].shape),
      **timings,
      'memory': memory_report(compiled),
      'xla_flops_per_device': flops,
      'xla_flops_all_devices': None if flops is None else flops * num_devices,
      'analytic_flops': analytic_per_token * tokens,
  }


def compile_steps(config) -> dict[str, Any]:
  """Lower and compile the train and eval steps from abstract values; the report as a dict."""
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = shd.rules_from_config(config.sharding_rules)
  optimizer, schedule = make_optimizer(config.optim, config.train.steps)
  tc, seq_len = config.train, config.data.seq_len
  tokens = tc.batch_size * seq_len
  with jax.set_mesh(mesh), shd.axis_rules(rules):
    setup = step_lib.make_setup(config, optimizer, schedule, mesh)
    train_step = step_lib.make_train_step(setup, z_loss=tc.z_loss,
                                          loss_chunk_size=tc.loss_chunk_size,
                                          **step_lib.hessian_options(config))
    train_batch = abstract_batch(setup, tc.batch_size, seq_len, tc.grad_accum_steps)
    train_compiled, train_times = _compile(train_step, setup.abstract_state, train_batch)
    eval_batch = abstract_batch(setup, tc.batch_size, seq_len, 1)
    eval_compiled, eval_times = _compile(step_lib.make_eval_step(setup),
                                         setup.abstract_state['params'], eval_batch)
  devices = mesh.devices.flatten()
  parameters = sum(math.prod(x.shape) for x in jax.tree.leaves(setup.abstract_state['params']))
  train_flops = flops_lib.train_flops_per_token(config.model, seq_len)
  eval_flops = flops_lib.forward_flops_per_token(config.model, seq_len)
  return {
      'num_devices': int(devices.size),
      'platform': devices[0].platform,
      'device_kind': devices[0].device_kind,
      'mesh': {axis: int(size) for axis, size in mesh.shape.items()},
      'parameters': int(parameters),
      'tokens_per_step': int(tokens),
      'total_formula': TOTAL_FORMULA,
      'train_step': _step_report(train_compiled, train_times, train_batch, tokens, train_flops,
                                 devices.size),
      'eval_step': _step_report(eval_compiled, eval_times, eval_batch, tokens, eval_flops,
                                devices.size),
  }


def _gb(num_bytes: int) -> str:
  return f'{num_bytes / 1e9:.4g}'


def report_lines(report: dict[str, Any]) -> list[str]:
  """The report as the lines the mode prints."""
  lines = [f'compile_only: {report["parameters"]:,} parameters; mesh {report["mesh"]} on '
           f'{report["num_devices"]} {report["platform"]} device(s) ({report["device_kind"]})']
  for name in ('train_step', 'eval_step'):
    step = report[name]
    lines.append(f'{name.replace("_", " ")} on batch {"x".join(map(str, step["batch_shape"]))}: '
                 f'lowered in {step["lower_seconds"]:.2f} s, compiled in '
                 f'{step["compile_seconds"]:.2f} s')
    m = step['memory']
    if m:
      lines.append(f'  per-device memory (GB): arguments {_gb(m["argument_bytes"])}, outputs '
                   f'{_gb(m["output_bytes"])}, temporaries {_gb(m["temp_bytes"])}, generated code '
                   f'{_gb(m["generated_code_bytes"])}, aliased {_gb(m["alias_bytes"])}')
      lines.append(f'  per-device total: {_gb(m["total_bytes"])} GB = {TOTAL_FORMULA} (aliased '
                   'outputs reuse donated argument buffers)')
    else:
      lines.append('  per-device memory: not reported by this backend')
    xla = step['xla_flops_per_device']
    xla_text = ('not reported by this backend' if xla is None else
                f'{xla:.4g} per device, {step["xla_flops_all_devices"]:.4g} on all '
                f'{report["num_devices"]} (loop bodies counted once)')
    lines.append(f'  FLOPs per step: XLA {xla_text}; analytic model FLOPs '
                 f'{step["analytic_flops"]:.4g}')
  return lines


def compile_only(config, workdir: str) -> dict[str, Any]:
  """The mode: compile, print the report and write it to workdir/compile_only.json."""
  report = compile_steps(config)
  report['config'] = json.loads(config.to_json_best_effort())
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, REPORT_FILE)
    with open(path, 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=2)
    for line in report_lines(report):
      print(line)
    print(f'wrote {path}')
  return report
