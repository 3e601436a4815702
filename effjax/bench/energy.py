"""GPU energy over a timed window, through NVML: joules per token beside tokens/s.

    with energy.Meter() as m:
      ...  # device work, synchronised (block_until_ready) before entering and before leaving
    m.joules, m.mean_watts, m.method, m.samples, m.unavailable_reason

Two ways to get joules, the first that works is used (`method` says which):
  'energy_counter'  the driver's cumulative energy counter (nvmlDeviceGetTotalEnergyConsumption,
                    mJ, Volta and newer), read at both ends: nothing of ours sampled, only
                    the driver's own update rate limits very short windows;
  'power_samples'   board power (nvmlDeviceGetPowerUsage, mW) sampled on a background thread
                    every `interval_s`, plus one reading at each end, integrated by the trapezoid
                    rule. Newer drivers average that reading over up to a second, so short windows
                    are smeared: one more reason to prefer the counter.
The power samples are taken in both cases (`power_joules` is a cross-check of the counter).
Joules and watts are summed over the devices JAX uses in this process (the local ones).

Everything is optional: where pynvml (the nvidia-ml-py package) is missing, NVML does not
initialise, or JAX's backend is not 'gpu', the meter measures nothing, `joules` stays None and
`unavailable_reason` says why; the benchmark rows then carry None and a note instead of failing.

Device work is asynchronous: energy covers the window between entering and leaving, so the caller
must block on its results before both, exactly as for a timing.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Sequence

def _nvml():
  """The pynvml module, imported only when a meter starts (it is an optional dependency)."""
  import pynvml  # pylint: disable=import-outside-toplevel
  return pynvml


def _jax_devices() -> list:
  import jax  # pylint: disable=import-outside-toplevel
  return list(jax.local_devices())


def _handle(nvml, device, visible: list[str]):
  """The NVML handle of a JAX device: by PCI bus id where JAX gives one, else by CUDA ordinal.

  NVML numbers every GPU of the machine, CUDA only the visible ones (CUDA_VISIBLE_DEVICES), so an
  ordinal is translated through that list (indices or GPU-/MIG- UUIDs) when it is set. Without a
  bus id, CUDA's ordinals are assumed in NVML's (PCI) order, as with CUDA_DEVICE_ORDER=PCI_BUS_ID.
  """
  bus_id = getattr(device, 'pci_bus_id', None)
  if bus_id:
    try:
      return nvml.nvmlDeviceGetHandleByPciBusId(bus_id), f'pci:{bus_id}'
    except Exception:  # pylint: disable=broad-except
      pass  # a form NVML does not take: the ordinal below
  ordinal = getattr(device, 'local_hardware_id', None)
  if ordinal is None:
    ordinal = device.id
  if ordinal < len(visible):
    entry = visible[ordinal]
    if entry.isdigit():
      return nvml.nvmlDeviceGetHandleByIndex(int(entry)), f'index:{entry}'
    return nvml.nvmlDeviceGetHandleByUUID(entry), f'uuid:{entry}'
  return nvml.nvmlDeviceGetHandleByIndex(ordinal), f'index:{ordinal}'


def trapezoid(samples: Sequence[tuple[float, float]]) -> float:
  """Integral of (time s, power W) samples, in joules."""
  return sum(0.5 * (p0 + p1) * (t1 - t0) for (t0, p0), (t1, p1) in zip(samples, samples[1:]))


class Meter:
  """Energy of the devices JAX uses between __enter__ and __exit__ (a no-op where unavailable)."""

  def __init__(self, devices: Sequence[Any] | None = None, interval_s: float = 0.025):
    self.interval_s = interval_s
    self._devices = devices
    self._handles: list = []
    self._nvml = None
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()
    self._power: list[tuple[float, float]] = []
    self._counter_start: list[int] | None = None
    self.device_ids: list[str] = []
    self.start_time: float | None = None
    self.end_time: float | None = None
    self.seconds: float | None = None
    self.joules: float | None = None
    self.power_joules: float | None = None
    self.mean_watts: float | None = None
    self.method: str | None = None
    self.unavailable_reason: str | None = None
    self.sampling_error: str | None = None

  @property
  def samples(self) -> int:
    """Power readings taken over the window (both ends included)."""
    return len(self._power)

  @property
  def available(self) -> bool:
    return self.unavailable_reason is None

  def _open(self) -> None:
    devices = _jax_devices() if self._devices is None else list(self._devices)
    if not devices or any(d.platform != 'gpu' for d in devices):
      kinds = sorted({d.platform for d in devices}) or ['none']
      self.unavailable_reason = f'JAX backend is {"/".join(kinds)}, not gpu'
      return
    try:
      nvml = _nvml()
    except ImportError as e:
      self.unavailable_reason = f'pynvml is not installed (pip install nvidia-ml-py): {e}'
      return
    try:
      nvml.nvmlInit()
    except Exception as e:  # pylint: disable=broad-except
      self.unavailable_reason = f'NVML did not initialise: {e}'
      return
    self._nvml = nvml
    visible = [v.strip() for v in os.environ.get('CUDA_VISIBLE_DEVICES', '').split(',')
               if v.strip()]
    try:
      for device in devices:
        handle, name = _handle(nvml, device, visible)
        self._handles.append(handle)
        self.device_ids.append(name)
      self._read_power()  # fails here, not on the thread, where power is not readable
    except Exception as e:  # pylint: disable=broad-except
      self.unavailable_reason = f'NVML could not read the devices: {e}'
      self._close()
      return
    try:
      self._read_counter()
      self._counter_start = []  # the counter works: it is read at the window's ends
    except Exception:  # pylint: disable=broad-except
      self._counter_start = None

  def _close(self) -> None:
    if self._nvml is not None:
      try:
        self._nvml.nvmlShutdown()
      except Exception:  # pylint: disable=broad-except
        pass
      self._nvml = None

  def _read_power(self) -> float:
    return sum(self._nvml.nvmlDeviceGetPowerUsage(h) for h in self._handles) / 1e3

  def _read_counter(self) -> list[int]:
    return [self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles]

  def _sample(self) -> float:
    """One power reading, stored; returns its time."""
    try:
      watts = self._read_power()
    except Exception as e:  # pylint: disable=broad-except
      self.sampling_error = str(e)
      return time.perf_counter()
    now = time.perf_counter()
    self._power.append((now, watts))
    return now

  def _run(self) -> None:
    while not self._stop.wait(self.interval_s):
      self._sample()

  def __enter__(self) -> 'Meter':
    self._open()
    if not self.available:
      return self
    if self._counter_start is not None:
      self._counter_start = self._read_counter()
    self.start_time = self._sample()
    self._thread = threading.Thread(target=self._run, name='effjax-energy', daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    if not self.available:
      return
    # The window ends at this reading; a sample the thread takes after it is dropped.
    self.end_time = self._sample()
    counter_end = self._read_counter() if self._counter_start is not None else None
    self._stop.set()
    self._thread.join()
    self._close()
    self._power = sorted(s for s in self._power if s[0] <= self.end_time)
    self.seconds = self.end_time - self.start_time
    self.power_joules = trapezoid(self._power) if len(self._power) > 1 else None
    if counter_end is not None:
      counted = sum(e - s for s, e in zip(self._counter_start, counter_end)) / 1e3
      if counted > 0:  # a counter that did not move (or was reset) says nothing: use power
        self.joules, self.method = counted, 'energy_counter'
    if self.joules is None and self.power_joules is not None:
      self.joules, self.method = self.power_joules, 'power_samples'
    if self.joules is None:
      self.unavailable_reason = f'no usable reading ({self.sampling_error or "window too short"})'
    elif self.seconds > 0:
      self.mean_watts = self.joules / self.seconds


def row_fields(meters: Sequence[Meter], tokens: float) -> dict[str, Any]:
  """Benchmark-row fields of one measurement made of several windows, over `tokens` timed tokens.

  joules_per_token is the energy of all windows over all their tokens; where no meter measured,
  every number is None and energy_note says why.
  """
  done = [m for m in meters if m.joules is not None]
  if not meters or len(done) < len(meters):
    reasons = sorted({m.unavailable_reason for m in meters if m.joules is None} - {None})
    return {'joules': None, 'joules_per_token': None, 'mean_watts': None, 'energy_method': None,
            'energy_note': '; '.join(reasons) or 'not measured'}
  joules = sum(m.joules for m in done)
  seconds = sum(m.seconds for m in done)
  methods = sorted({m.method for m in done})
  return {
      'joules': joules,
      'joules_per_token': joules / tokens if tokens else None,
      'mean_watts': joules / seconds if seconds > 0 else None,
      'energy_method': '+'.join(methods),
      'energy_windows_j': [m.joules for m in done],
      'energy_power_samples': sum(m.samples for m in done),
      'energy_devices': done[0].device_ids,
      'energy_note': None,
  }
