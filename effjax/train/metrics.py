"""Metrics to the console (a progress line), a JSONL file and TensorBoard (tensorboardX).

Only process 0 writes; every process may call. Values are plain Python floats by the time they
get here (the trainer fetches them from the device once per log interval).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Any, Mapping

import jax


def device_memory() -> dict[str, float]:
  """Peak/current bytes in use on the first local device; host peak RSS where devices don't say."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return {'memory_peak_gb': stats['peak_bytes_in_use'] / 1e9,
            'memory_in_use_gb': stats.get('bytes_in_use', 0) / 1e9}
  rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
  return {'host_peak_rss_gb': rss_kb / 1e6}


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'


def progress_line(step: int, total: int, m: Mapping[str, Any]) -> str:
  parts = [f'step {step:>{len(str(total))}}/{total}', f'loss {m["loss"]:.4f}']
  if 'learning_rate' in m:
    parts.append(f'lr {m["learning_rate"]:.2e}')
  if 'grad_norm' in m:
    parts.append(f'gnorm {m["grad_norm"]:.3f}')
  if 'tokens_per_second' in m:
    parts.append(f'{m["tokens_per_second"] / 1e3:,.1f}k tok/s')
  if 'step_time_ms' in m:
    parts.append(f'{m["step_time_ms"]:.0f} ms/step')
  if m.get('mfu') is not None:
    parts.append(f'MFU {100 * m["mfu"]:.1f}%')
  if 'memory_peak_gb' in m:
    parts.append(f'mem {m["memory_peak_gb"]:.2f} GB')
  elif 'host_peak_rss_gb' in m:
    parts.append(f'host mem {m["host_peak_rss_gb"]:.2f} GB')
  if 'sophia_win_rate' in m:  # Sophia's fraction of unclipped coordinates
    parts.append(f'win {m["sophia_win_rate"]:.2f}')
  if m.get('skipped_steps'):
    parts.append(f'skipped {m["skipped_steps"]}')
  if 'eta_seconds' in m:
    parts.append(f'ETA {format_duration(m["eta_seconds"])}')
  return ' | '.join(parts)


class MetricsWriter:
  """Appends {'step', **metrics} to workdir/metrics.jsonl and TensorBoard scalars to workdir/tb."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
      from tensorboardX import SummaryWriter  # imported lazily: pulls in protobuf machinery
      self._tb = SummaryWriter(os.path.join(workdir, 'tb'))

  def write(self, step: int, metrics: Mapping[str, Any], prefix: str = '') -> None:
    if not self.enabled:
      return
    values = {f'{prefix}{k}': float(v) for k, v in metrics.items() if v is not None}
    self._jsonl.write(json.dumps({'step': int(step), 'time': time.time(), **values}) + '\n')
    self._jsonl.flush()
    for k, v in values.items():
      self._tb.add_scalar(k, v, int(step))

  def text(self, step: int, tag: str, text: str) -> None:
    if self.enabled:
      self._tb.add_text(tag, text, int(step))

  def print(self, line: str) -> None:
    if self.enabled:
      print(line, flush=True, file=sys.stdout)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
