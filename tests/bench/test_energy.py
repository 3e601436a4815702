"""The energy meter against a fake NVML: the power integral, the counter path, the no-op paths,
and the benchmark rows' joules per token (CPU, no real NVML)."""

import math
import sys
import time
import types

import pytest

from effjax.bench import energy

GPUS = [types.SimpleNamespace(platform='gpu', id=i, local_hardware_id=i) for i in range(2)]
BASE_W, SWING_W, PERIOD_S = 250.0, 100.0, 0.4


def power_w(t: float) -> float:
  return BASE_W + SWING_W * math.sin(2 * math.pi * t / PERIOD_S)


def energy_j(t0: float, t1: float) -> float:
  """The analytic integral of power_w over [t0, t1]."""
  f = lambda t: BASE_W * t - SWING_W * PERIOD_S / (2 * math.pi) * math.cos(2 * math.pi * t /
                                                                          PERIOD_S)
  return f(t1) - f(t0)


class NVMLError(Exception):
  pass


def fake_nvml(counter_step_mj=None, init_error=None) -> types.ModuleType:
  """A pynvml stand-in: power follows power_w(time.perf_counter()) on every handle; the energy
  counter of handle i advances (i + 1) * counter_step_mj per read, or is unsupported (None)."""
  nvml = types.ModuleType('pynvml')
  nvml.NVMLError = NVMLError
  nvml.reads = {}
  nvml.open = 0

  def init():
    if init_error:
      raise NVMLError(init_error)
    nvml.open += 1

  def shutdown():
    nvml.open -= 1

  def counter(handle):
    if counter_step_mj is None:
      raise NVMLError('Not Supported')
    nvml.reads[handle] = nvml.reads.get(handle, 0) + 1
    return 10 ** 9 + nvml.reads[handle] * (handle + 1) * counter_step_mj

  nvml.nvmlInit, nvml.nvmlShutdown = init, shutdown
  nvml.nvmlDeviceGetHandleByIndex = lambda i: i
  nvml.nvmlDeviceGetPowerUsage = lambda handle: int(round(1e3 * power_w(time.perf_counter())))
  nvml.nvmlDeviceGetTotalEnergyConsumption = counter
  return nvml


def _busy(seconds: float) -> None:
  end = time.perf_counter() + seconds
  while time.perf_counter() < end:
    time.sleep(0.002)


def test_jax_devices_map_to_nvml_by_bus_id_or_visible_ordinal():
  nvml = fake_nvml()
  nvml.nvmlDeviceGetHandleByPciBusId = lambda bus: f'bus {bus}'
  nvml.nvmlDeviceGetHandleByUUID = lambda uuid: f'uuid {uuid}'
  gpu = lambda i, **kw: types.SimpleNamespace(platform='gpu', id=i, local_hardware_id=i, **kw)
  assert energy._handle(nvml, gpu(0, pci_bus_id='0000:1A:00.0'), ['5']) == (
      'bus 0000:1A:00.0', 'pci:0000:1A:00.0')
  # CUDA ordinals count only the visible GPUs; NVML indices count them all.
  assert energy._handle(nvml, gpu(1), ['3', '1']) == (1, 'index:1')
  assert energy._handle(nvml, gpu(0), ['3', '1']) == (3, 'index:3')
  assert energy._handle(nvml, gpu(0), ['GPU-ab12']) == ('uuid GPU-ab12', 'uuid:GPU-ab12')
  assert energy._handle(nvml, gpu(2), []) == (2, 'index:2')


def test_trapezoid_is_exact_for_a_line():
  assert energy.trapezoid([(0.0, 100.0), (0.5, 200.0), (2.0, 500.0)]) == pytest.approx(
      0.5 * 150 + 1.5 * 350)
  assert energy.trapezoid([(1.0, 300.0)]) == 0


def test_power_samples_integrate_to_the_analytic_energy(monkeypatch):
  nvml = fake_nvml(counter_step_mj=None)
  monkeypatch.setitem(sys.modules, 'pynvml', nvml)
  with energy.Meter(devices=GPUS, interval_s=0.005) as m:
    _busy(0.3)
  assert m.unavailable_reason is None and m.method == 'power_samples'
  expected = len(GPUS) * energy_j(m.start_time, m.end_time)
  assert m.joules == pytest.approx(expected, rel=0.02)
  assert m.samples >= 10 and m.device_ids == ['index:0', 'index:1']
  assert m.mean_watts == pytest.approx(m.joules / m.seconds)
  assert nvml.open == 0  # NVML shut down again


def test_the_energy_counter_is_preferred_where_supported(monkeypatch):
  nvml = fake_nvml(counter_step_mj=1500)
  monkeypatch.setitem(sys.modules, 'pynvml', nvml)
  with energy.Meter(devices=GPUS, interval_s=0.005) as m:
    _busy(0.1)
  assert m.method == 'energy_counter'
  # Read once at each end: device 0 advanced 1.5 J, device 1 3 J.
  assert m.joules == pytest.approx(1.5 + 3.0)
  assert m.mean_watts == pytest.approx(4.5 / m.seconds)
  # The power samples are still taken, as a cross-check.
  assert m.power_joules == pytest.approx(len(GPUS) * energy_j(m.start_time, m.end_time), rel=0.05)


def test_a_counter_that_does_not_move_falls_back_to_power(monkeypatch):
  monkeypatch.setitem(sys.modules, 'pynvml', fake_nvml(counter_step_mj=0))
  with energy.Meter(devices=GPUS[:1], interval_s=0.005) as m:
    _busy(0.05)
  assert m.method == 'power_samples' and m.joules == pytest.approx(m.power_joules)


def test_without_pynvml_nvml_or_a_gpu_the_meter_is_a_no_op(monkeypatch):
  monkeypatch.setitem(sys.modules, 'pynvml', None)  # import pynvml raises ImportError
  ran = []
  with energy.Meter(devices=GPUS) as m:
    ran.append(1)
  assert ran and m.joules is None and m.mean_watts is None and m.method is None
  assert 'pynvml is not installed' in m.unavailable_reason and m.samples == 0
  monkeypatch.setitem(sys.modules, 'pynvml', fake_nvml(init_error='Driver Not Loaded'))
  with energy.Meter(devices=GPUS) as m:
    pass
  assert m.joules is None and 'NVML did not initialise: Driver Not Loaded' in m.unavailable_reason
  with energy.Meter() as m:  # the test's own JAX devices: CPU
    pass
  assert m.joules is None and m.unavailable_reason == 'JAX backend is cpu, not gpu'


def test_row_fields_are_joules_over_timed_tokens():
  meters = []
  for joules, seconds in ((6.0, 2.0), (4.0, 3.0)):
    m = energy.Meter(devices=GPUS)
    m.joules, m.seconds, m.method, m.device_ids = joules, seconds, 'energy_counter', ['index:0']
    meters.append(m)
  fields = energy.row_fields(meters, tokens=1000)
  assert fields['joules'] == 10.0 and fields['joules_per_token'] == 0.01
  assert fields['mean_watts'] == 2.0 and fields['energy_method'] == 'energy_counter'
  off = energy.Meter(devices=GPUS)
  off.unavailable_reason = 'pynvml is not installed'
  fields = energy.row_fields([meters[0], off], tokens=1000)
  assert fields['joules_per_token'] is None and fields['mean_watts'] is None
  assert fields['energy_method'] is None and fields['energy_note'] == 'pynvml is not installed'
  # Rows without energy still render: a dash in each energy column.
  from effjax.bench import decode as decode_bench
  row = {'context': 8, 'tokens_per_s': 100.0, **fields}
  assert '| - | - | - |' in results_markdown(decode_bench.COLUMNS, row)


ENV = {'num_devices': 2, 'device_kind': 'fake', 'platform': 'gpu', 'jax': '-', 'flax': '-',
       'optax': '-', 'git_commit': None, 'date_utc': '-', 'command': 'c'}


def results_markdown(columns, row) -> str:
  from effjax.bench import results
  return results.markdown(ENV, columns, [row], 't')


def _tiny_config():
  from configs import default
  c = default.get_config()
  c.model.d_model, c.model.mlp_dim, c.model.num_layers = 32, 64, 1
  c.model.num_heads, c.model.num_kv_heads = 2, 2
  c.data.seq_len, c.train.batch_size = 16, 8
  return c


def test_the_train_row_carries_joules_per_timed_token(monkeypatch):
  from effjax.bench import results
  from effjax.bench import train as train_bench

  monkeypatch.setitem(sys.modules, 'pynvml', fake_nvml(counter_step_mj=2000))
  monkeypatch.setattr(energy, '_jax_devices', lambda: GPUS)  # as if JAX ran on two GPUs
  row = train_bench.run_one(_tiny_config(), {}, warmup_steps=1, steps=1, repeats=3)
  assert row['tokens_timed'] == 8 * 16 * 1 * 3
  # One meter per timed window, each 2 J + 4 J on the fake counters.
  assert row['energy_method'] == 'energy_counter' and row['energy_windows_j'] == [6.0] * 3
  assert row['joules'] == 18.0
  assert row['joules_per_token'] == pytest.approx(18.0 / row['tokens_timed'])
  assert row['mean_watts'] > 0 and row['tokens_per_second'] > 0
  table = results.markdown(ENV, train_bench.COLUMNS, [row], 't')
  assert '| J/token | power (W) | energy from |' in table
  assert f'| {row["joules_per_token"]:.3g} |' in table and '| energy_counter |' in table
