"""Two processes on one machine train exactly as one process does; a rerun resumes across both.

Two CPU processes with 4 devices each form one 8-device run through jax.distributed (coordinator on
localhost, gloo collectives), on a data x fsdp x tensor = 2x2x2 mesh that spans both processes, so
parameters, optimizer state and batches are split between them. They train 4 steps and checkpoint,
then the same command with 6 steps resumes from that checkpoint in both processes.

The reference is one process with all 8 devices, trained 6 steps without a break. The data pipeline
gives each process its own slice of the documents, so a global batch of two processes is not what
one process reads; the reference therefore reads, through the real pipeline, the two per-process
streams side by side. Everything else — the sharded step, cross-process reductions, the metrics,
the checkpoint of per-process iterator positions and its restore — is the code under test, and the
losses must agree to float32 rounding. The schedule is constant after warmup so that a 4-step run
followed by a resumed 6-step one sees the same learning rates as one 6-step run.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG_FILE = 'configs/sharded_cpu.py'  # data=2, fsdp=2, tensor=2
PROCESSES = 2
TIMEOUT_S = 240  # per launch; a healthy one takes ~20 s on two cores


def _overrides(data_dir: str, steps: int) -> dict:
  return {
      'data.data_dir': data_dir, 'data.max_documents': 40, 'data.seq_len': 32,
      'model.d_model': 64, 'model.mlp_dim': 128, 'model.num_layers': 2,
      'train.batch_size': 16, 'train.steps': steps, 'train.log_every': 1,
      'train.eval_every': 0, 'train.eval_batches': 1, 'train.checkpoint_every': 2,
      'optim.warmup_steps': 1, 'optim.schedule': 'constant', 'generate.at_end': False,
  }


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env() -> dict:
  """This session's environment with 4 CPU devices per process instead of conftest's 8.

  The other XLA flags (conftest's optimisation level) stay, so both runs compile alike. Proxy
  variables go: the coordinator's gRPC channel to localhost must not be sent through a proxy.
  """
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env = {k: v for k, v in os.environ.items() if '_proxy' not in k.lower()}
  env.update(JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
             XLA_FLAGS=' '.join(flags + ['--xla_force_host_platform_device_count=4']))
  return env


def _train_two_processes(workdir: Path, data_dir: str, steps: int, logs: Path) -> str:
  """Runs both processes to completion; returns process 0's output (the only one that prints)."""
  port = _free_port()
  overrides = [f'--config.{k}={v}' for k, v in _overrides(data_dir, steps).items()]
  procs, outs = [], []
  try:
    for i in range(PROCESSES):
      out = open(logs / f'steps{steps}_process{i}.log', 'w', encoding='utf-8')
      outs.append(out)
      procs.append(subprocess.Popen(
          [sys.executable, '-m', 'effjax.main', f'--config={CONFIG_FILE}', f'--workdir={workdir}',
           *overrides, '--config.distributed.initialize=True',
           f'--config.distributed.coordinator_address=localhost:{port}',
           f'--config.distributed.num_processes={PROCESSES}',
           f'--config.distributed.process_id={i}'],
          cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT))
    # Polled rather than waited on one by one: when one process fails, its peer would otherwise
    # sit in a collective or in start-up until JAX's own five-minute timeouts.
    deadline = time.monotonic() + TIMEOUT_S
    while (any(p.poll() is None for p in procs) and time.monotonic() < deadline
           and not any(p.poll() for p in procs)):
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
    for out in outs:
      out.close()
  codes = [p.returncode for p in procs]
  texts = [(logs / f'steps{steps}_process{i}.log').read_text() for i in range(PROCESSES)]
  assert codes == [0] * PROCESSES, f'exit codes {codes} (negative: killed here):\n' + '\n'.join(
      f'--- process {i}:\n{text[-2000:]}' for i, text in enumerate(texts))
  return texts[0]


def _side_by_side(batches) -> dict:
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _train_reference(workdir: Path, data_dir: str, steps: int, monkeypatch) -> None:
  """One process, 8 devices, reading what the two processes read, as one global batch."""
  import grain
  from configs import sharded_cpu
  from effjax import config as config_lib
  from effjax import data as data_lib
  from effjax.data import pipeline, tokenizers
  from effjax.train import trainer

  def train_iterator(config, *, process_index=0, process_count=1):
    assert (process_index, process_count) == (0, 1)
    tokenizer = tokenizers.make_tokenizer(config)
    hosts = [pipeline.train_dataset(config, tokenizer, process_index=p, process_count=PROCESSES)
             for p in range(PROCESSES)]
    return iter(grain.experimental.ZipIterDataset(hosts).map(_side_by_side))

  def eval_batches(config, num_batches, *, process_index=0, process_count=1):
    assert (process_index, process_count) == (0, 1)
    hosts = [pipeline.make_eval_batches(config, num_batches, process_index=p,
                                        process_count=PROCESSES) for p in range(PROCESSES)]
    return [_side_by_side(batches) for batches in zip(*hosts)]

  monkeypatch.setattr(data_lib, 'make_train_iterator', train_iterator)
  monkeypatch.setattr(data_lib, 'make_eval_batches', eval_batches)
  config = sharded_cpu.get_config()
  config.update_from_flattened_dict(_overrides(data_dir, steps))
  config_lib.validate(config)
  trainer.train(config, str(workdir))


def _metrics(workdir: Path) -> dict[str, dict[int, float]]:
  """{'train/loss': {step: value}, 'eval/loss': {...}} from metrics.jsonl (written by process 0)."""
  out = {'train/loss': {}, 'eval/loss': {}}
  for line in (workdir / 'metrics.jsonl').read_text().splitlines():
    record = json.loads(line)
    for key, values in out.items():
      if key in record:
        values[record['step']] = record[key]
  return out


def test_two_processes_match_one_and_resume(tmp_path, stdlib_data_dir, monkeypatch):
  workdir = tmp_path / 'two_processes'
  out = _train_two_processes(workdir, stdlib_data_dir, 4, tmp_path)
  assert 'on 8 cpu device(s)' in out and 'step 4/4 | loss' in out, out[-3000:]
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['2', '4']
  # The iterator position of each process is saved, next to the arrays of the same step.
  saved = workdir / 'checkpoints' / '4' / 'data_iter'
  assert sorted(p.name for p in saved.glob('process_*')) == ['process_0-of-2.json',
                                                             'process_1-of-2.json']

  out = _train_two_processes(workdir, stdlib_data_dir, 6, tmp_path)
  assert 'resumed from the checkpoint at step 4' in out, out[-3000:]
  assert 'step 6/6 | loss' in out and 'step 2/6' not in out, out[-3000:]
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['2', '4', '6']

  reference = tmp_path / 'one_process'
  _train_reference(reference, stdlib_data_dir, 6, monkeypatch)

  got, want = _metrics(workdir), _metrics(reference)
  # Which steps get logged is the trainer's choice (a first step after a start may be left out);
  # the steps both runs logged must reach back before the resume and forward to its end.
  steps = sorted(got['train/loss'].keys() & want['train/loss'].keys())
  assert steps and steps[0] <= 4 and steps[-1] == 6, (got, want)
  assert want['train/loss'][6] < want['train/loss'][steps[0]]  # it learns, so a match means much
  # At most the order of float32 sums differs (gloo all-reduces across processes vs. one process's
  # reductions): the train losses came out bit-identical and the eval loss 1e-7 apart when this was
  # written. 1e-5 leaves room for other XLA versions and still catches a real difference: one
  # process reading its own data instead of the two slices already moves step 2's loss by 2%.
  np.testing.assert_allclose([got['train/loss'][s] for s in steps],
                             [want['train/loss'][s] for s in steps], rtol=1e-5)
  np.testing.assert_allclose(got['eval/loss'][6], want['eval/loss'][6], rtol=1e-5)


def _dist(**fields):
  from configs import base
  dist = base.get_config().distributed
  dist.update(fields)
  return dist


def test_settings_come_from_the_config_then_the_environment(monkeypatch):
  from effjax.parallel.distributed import resolve
  monkeypatch.delenv('EFFJAX_NUM_PROCESSES', raising=False)
  monkeypatch.delenv('EFFJAX_PROCESS_ID', raising=False)
  assert resolve(_dist()) is None  # one process: nothing to start
  assert resolve(_dist(initialize=True)) == {}  # Cloud TPU, SLURM, Open MPI: JAX finds the rest
  monkeypatch.setenv('EFFJAX_NUM_PROCESSES', '4')
  monkeypatch.setenv('EFFJAX_PROCESS_ID', '3')
  assert resolve(_dist()) == {'num_processes': 4, 'process_id': 3}  # > 1 process implies it
  assert resolve(_dist(coordinator_address='10.0.0.1:1234', num_processes=2, process_id=1)) == {
      'coordinator_address': '10.0.0.1:1234', 'num_processes': 2, 'process_id': 1}


def test_inconsistent_settings_are_one_clear_error(monkeypatch):
  from effjax.parallel.distributed import resolve
  monkeypatch.delenv('EFFJAX_NUM_PROCESSES', raising=False)
  monkeypatch.delenv('EFFJAX_PROCESS_ID', raising=False)
  with pytest.raises(ValueError, match=r'^distributed\.process_id=2 must be less than '
                     r'distributed\.num_processes=2 '):
    resolve(_dist(num_processes=2, process_id=2))
  with pytest.raises(ValueError, match=r'^distributed\.num_processes=-3: must be a positive'):
    resolve(_dist(num_processes=-3))
  monkeypatch.setenv('EFFJAX_PROCESS_ID', '5')
  with pytest.raises(ValueError, match=r'^\$EFFJAX_PROCESS_ID=5 must be less than '
                     r'distributed\.num_processes=4 '):
    resolve(_dist(num_processes=4))
  monkeypatch.setenv('EFFJAX_NUM_PROCESSES', 'two')
  with pytest.raises(ValueError, match=r"^\$EFFJAX_NUM_PROCESSES='two': must be an integer"):
    resolve(_dist())


def test_more_than_one_process_without_a_coordinator_is_one_clear_error(tmp_path):
  """Off Cloud TPU and clusters JAX cannot find process 0: exit status 2 and one line, no hang."""
  env = {k: v for k, v in _env().items() if not k.startswith(('SLURM_', 'OMPI_', 'KUBERNETES_'))}
  env.pop('JAX_COORDINATOR_ADDRESS', None)
  proc = subprocess.run(
      [sys.executable, '-m', 'effjax.main', '--config=configs/default.py',
       f'--workdir={tmp_path}', '--config.distributed.num_processes=2',
       '--config.distributed.process_id=1'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('effjax: config error: jax.distributed.initialize: '), last
  assert 'distributed.coordinator_address' in last and 'distributed.process_id' in last, last
