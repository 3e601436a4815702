"""The training loop: build from the config, resume if a checkpoint exists, train, evaluate, sample.

Running the same command twice continues from the latest checkpoint (parameters, optimizer state,
step and data position). Metrics of a step are read back one step later, so the host never waits
for the device just to log.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from absl import logging
import jax

from effjax import data as data_lib
from effjax.compress import run as compress_run
from effjax.compress import training as compress_training
from effjax.infer.generate import generate_text
from effjax.models import attention
from effjax.optim.factory import make_optimizer
from effjax.parallel import mesh as mesh_lib
from effjax.parallel import sharding as shd
from effjax.train import flops as flops_lib
from effjax.train import step as step_lib
from effjax.train.checkpoint import CheckpointError, Checkpointer
from effjax.train.compile_only import compile_only
from effjax.train.metrics import MetricsWriter, device_memory, progress_line


class NonFiniteLossError(RuntimeError):
  """Training produced a non-finite loss or gradient and the nan_policy says stop."""


class PreemptionWatch:
  """Turns SIGTERM (how schedulers and Cloud TPU announce preemption) into a flag read per step.

  Single process: a Python handler sets the flag; the step in flight finishes, a checkpoint is
  written and train() returns normally (exit status 0). Several processes: JAX's coordination
  service already catches SIGTERM and agrees on one step for all hosts
  (Checkpointer.reached_preemption); a Python handler there would replace its C++ one, so none is
  installed.
  """

  def __init__(self, multi_process: bool):
    self.requested = False
    self._multi_process = multi_process
    self._previous = None

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    logging.warning('received signal %d: finishing the current step, then checkpointing', signum)

  def __enter__(self) -> 'PreemptionWatch':
    if not self._multi_process and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


@dataclass
class Run:
  """What a mode needs: the config, mesh, compiled setup, data and checkpoints."""
  config: Any
  workdir: str
  mesh: jax.sharding.Mesh
  rules: shd.Rules
  setup: step_lib.TrainSetup
  tokenizer: Any
  checkpointer: Checkpointer
  writer: MetricsWriter


def build_run(config, workdir: str, read_only: bool = False) -> Run:
  """The run of config in workdir; read_only writes nothing there (no metrics, no TensorBoard).

  A workdir written by --mode=compress carries its compression (compression.json), applied here.
  """
  config = compress_run.apply_recorded(config, workdir)
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = shd.rules_from_config(config.sharding_rules)
  tokenizer = data_lib.make_tokenizer(config)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(f'model.vocab_size={config.model.vocab_size} is smaller than the '
                     f'{config.data.tokenizer} tokenizer vocabulary ({tokenizer.vocab_size}); set '
                     f'it to at least {tokenizer.vocab_size} (a multiple of 128 is fastest)')
  optimizer, schedule = make_optimizer(config.optim, config.train.steps)
  with jax.set_mesh(mesh), shd.axis_rules(rules):
    setup = step_lib.make_setup(config, optimizer, schedule, mesh)
  checkpointer = Checkpointer(os.path.join(workdir, 'checkpoints'),
                              save_every=config.train.checkpoint_every,
                              keep=config.train.keep_checkpoints,
                              async_save=config.train.async_checkpointing)
  writer = MetricsWriter(workdir, enabled=False if read_only else None)
  return Run(config, workdir, mesh, rules, setup, tokenizer, checkpointer, writer)


def _evaluate(run: Run, eval_step, params, batches) -> dict[str, float]:
  loss_sum, tokens = 0.0, 0.0
  exit_sums: dict[str, float] = {}  # exit<l>_loss_sum of a model with early exits
  for batch in batches:
    out = eval_step(params, step_lib.device_batch(run.setup, batch, 1))
    loss_sum += float(out['loss_sum'])
    tokens += float(out['tokens'])
    for k in out:
      if k.startswith('exit'):
        exit_sums[k] = exit_sums.get(k, 0.0) + float(out[k])
  loss = loss_sum / max(tokens, 1.0)
  exits = {k[:-len('_sum')]: v / max(tokens, 1.0) for k, v in exit_sums.items()}
  return {'loss': loss, 'perplexity': math.exp(min(loss, 50.0)), 'tokens': tokens, **exits}


def _sample(run: Run, params, step: int) -> str:
  g = run.config.generate
  text = generate_text(run.setup.graphdef, params, run.tokenizer, g.prompt, g.max_new_tokens,
                       temperature=g.temperature, top_k=g.top_k, seed=run.config.seed)
  run.writer.text(step, 'sample', text)
  return text


def _restore(run: Run, step: int, data_iterator=None) -> dict:
  """Restore one step; a checkpoint that cannot be read becomes one CheckpointError naming it."""
  try:
    return run.checkpointer.restore(step, run.setup.abstract_state, data_iterator=data_iterator)
  except CheckpointError:
    raise
  except Exception as e:  # corrupt files surface as many error types (decode, tensorstore, I/O)
    directory = os.path.join(run.workdir, 'checkpoints')
    detail = ' '.join(str(e).split())[:300]
    raise CheckpointError(
        f'the checkpoint at step {step} under {directory} could not be read ({type(e).__name__}: '
        f'{detail}); nothing on disk was changed. Steps present: {run.checkpointer.all_steps()}; '
        f'move {directory}/{step} aside to resume from an earlier one.') from e


def _restore_or_init(run: Run, data_iterator=None) -> tuple[dict, int]:
  latest = run.checkpointer.latest_step()
  if latest is None:
    return run.setup.init(run.config.seed), 0
  state = _restore(run, latest, data_iterator)
  logging.info('restored checkpoint at step %d', latest)
  run.writer.print(f'resumed from the checkpoint at step {latest}')
  return state, latest


def train(config, workdir: str) -> dict[str, Any]:
  """Train per config.train; returns the final metrics (train loss, eval loss, sample)."""
  os.makedirs(workdir, exist_ok=True)
  config = compress_run.apply_recorded(config, workdir)  # fine-tuning a compressed model
  run = build_run(config, workdir)
  tc = config.train
  process, processes = jax.process_index(), jax.process_count()
  if process == 0:
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=2))

  flops_per_token = flops_lib.train_flops_per_token(config.model, config.data.seq_len)
  peak = flops_lib.peak_flops_per_device(override_tflops=tc.peak_tflops)
  tokens_per_step = tc.batch_size * config.data.seq_len

  with jax.set_mesh(run.mesh), shd.axis_rules(run.rules):
    train_iter = data_lib.make_train_iterator(config, process_index=process,
                                              process_count=processes)
    eval_batches = data_lib.make_eval_batches(config, tc.eval_batches, process_index=process,
                                              process_count=processes)
    state, start = _restore_or_init(run, train_iter)
    train_step = step_lib.make_train_step(run.setup, z_loss=tc.z_loss,
                                          loss_chunk_size=tc.loss_chunk_size,
                                          forward_losses=compress_training.forward_losses(config),
                                          **step_lib.hessian_options(config),
                                          **step_lib.exit_options(config))
    eval_step = step_lib.make_eval_step(run.setup)
    run.writer.print(
        f'effjax: {config.model.num_layers} layers, d_model {config.model.d_model}, pattern '
        f'"{config.model.pattern}"; mesh {dict(run.mesh.shape)} on {jax.device_count()} '
        f'{jax.devices()[0].platform} device(s); {tokens_per_step} tokens/step; '
        f'{flops_per_token / 1e6:.1f} MFLOPs/token')
    backends = attention.op_backends(config.model)
    if backends:
      run.writer.print('effjax: flash attention backend per layer kind: ' +
                       ', '.join(f'{k}={v}' for k, v in backends.items()))

    summary: dict[str, Any] = {'start_step': start}
    pending = None  # (step, metrics on device) of the step dispatched last
    window_start, window_steps, skipped, consecutive_skips = time.perf_counter(), 0, 0, 0
    last_train: dict[str, float] = {}

    def finish_step(step_done: int, metrics_dev) -> None:
      nonlocal skipped, consecutive_skips, window_start, window_steps, last_train
      finite = int(metrics_dev['finite'])  # blocks on the step before the one just dispatched
      if not finite:
        skipped += 1
        consecutive_skips += 1
        msg = (f'non-finite loss or gradient at step {step_done}: the update was not applied')
        if tc.nan_policy == 'stop':
          raise NonFiniteLossError(f'{msg}; stopping (train.nan_policy=stop). The last checkpoint '
                                   'is intact; lower optim.learning_rate or set clip_norm.')
        if consecutive_skips >= tc.max_consecutive_nan_skips:
          raise NonFiniteLossError(f'{msg}; {consecutive_skips} non-finite steps in a row '
                                   f'(train.max_consecutive_nan_skips), stopping.')
        logging.warning('%s; skipped (train.nan_policy=skip)', msg)
      else:
        consecutive_skips = 0
      if step_done == start + 1:  # the first step includes compilation: keep it out of the rates
        m = {k: float(v) for k, v in jax.device_get(metrics_dev).items()}
        run.writer.write(step_done, m, 'train/')  # its loss still counts (a resumed run's first)
        run.writer.print(f'first step {step_done} (compile + run) took '
                         f'{time.perf_counter() - window_start:.1f} s, loss {m["loss"]:.4f}')
        window_start, window_steps = time.perf_counter(), 0
        return
      window_steps += 1
      if step_done % tc.log_every == 0 or step_done == tc.steps:
        now = time.perf_counter()
        step_time = (now - window_start) / max(window_steps, 1)
        m = {k: float(v) for k, v in jax.device_get(metrics_dev).items()}
        m['step_time_ms'] = 1e3 * step_time
        m['tokens_per_second'] = tokens_per_step / step_time
        m['mfu'] = flops_lib.mfu(m['tokens_per_second'], flops_per_token, jax.device_count(), peak)
        m['skipped_steps'] = skipped
        m['eta_seconds'] = step_time * (tc.steps - step_done)
        m.update(device_memory())
        run.writer.write(step_done, {k: v for k, v in m.items() if k != 'eta_seconds'}, 'train/')
        run.writer.print(progress_line(step_done, tc.steps, m))
        last_train = m
        window_start, window_steps = time.perf_counter(), 0

    profiling = False
    preempted_at = None
    with PreemptionWatch(multi_process=processes > 1) as watch:
      for step in range(start, tc.steps):
        if tc.profile_steps and step == start + 5:
          jax.profiler.start_trace(os.path.join(workdir, 'profile'))
          profiling = True
        batch = step_lib.device_batch(run.setup, next(train_iter), tc.grad_accum_steps)
        state, metrics = train_step(state, batch)
        if pending is not None:
          finish_step(*pending)
        pending = (step + 1, metrics)
        if profiling and step == start + 5 + tc.profile_steps:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()
          profiling = False
        step_done = step + 1
        evaluate_now = tc.eval_every and step_done % tc.eval_every == 0 and step_done < tc.steps
        if evaluate_now:
          finish_step(*pending)
          pending = None
          eval_start = time.perf_counter()
          ev = _evaluate(run, eval_step, state['params'], eval_batches)
          window_start += time.perf_counter() - eval_start  # keep evaluation out of step times
          run.writer.write(step_done, ev, 'eval/')
          run.writer.print(f'eval at step {step_done}: loss {ev["loss"]:.4f}, '
                           f'perplexity {ev["perplexity"]:.3f} over {int(ev["tokens"])} tokens')
        run.checkpointer.save(step_done, state, data_iterator=train_iter,
                              metadata={'step': step_done, 'config': config.to_dict()})
        if step_done < tc.steps and (
            watch.requested or (processes > 1 and run.checkpointer.reached_preemption(step_done))):
          preempted_at = step_done  # the checkpoint below is forced at this step
          break
      if pending is not None:
        finish_step(*pending)
      if profiling:
        jax.profiler.stop_trace()

    final_step = int(state['step'])
    run.checkpointer.save(final_step, state, data_iterator=train_iter, force=True,
                          metadata={'step': final_step, 'config': config.to_dict()})
    summary.update(final_step=final_step, train=last_train, skipped_steps=skipped)
    if preempted_at is not None:
      summary['preempted'] = True
      run.checkpointer.wait()  # on disk before the message says so
      run.writer.print(f'preempted: stopped after step {final_step} of {tc.steps} with a '
                       f'checkpoint saved; rerun the same command to resume')
    else:
      ev = _evaluate(run, eval_step, state['params'], eval_batches)
      run.writer.write(final_step, ev, 'eval/')
      run.writer.print(f'eval at step {final_step}: loss {ev["loss"]:.4f}, perplexity '
                       f'{ev["perplexity"]:.3f} over {int(ev["tokens"])} held-out tokens')
      summary['eval'] = ev
      if config.generate.at_end:
        text = _sample(run, state['params'], final_step)
        run.writer.print('sample:\n' + text)
        summary['sample'] = text
    train_iter.close()  # stops grain's read-ahead threads and worker processes
  run.checkpointer.wait()
  run.checkpointer.close()
  run.writer.close()
  if process == 0:
    with open(os.path.join(workdir, 'summary.json'), 'w', encoding='utf-8') as f:
      json.dump(summary, f, indent=2, default=float)
  return summary


def _load_latest(run: Run) -> tuple[dict, int]:
  latest = run.checkpointer.latest_step()
  if latest is None:
    raise FileNotFoundError(f'no checkpoint under {run.workdir}/checkpoints: train first '
                            f'(--config.mode=train) or point --workdir at a trained run')
  return _restore(run, latest), latest


def evaluate(config, workdir: str) -> dict[str, float]:
  run = build_run(config, workdir)
  with jax.set_mesh(run.mesh), shd.axis_rules(run.rules):
    state, step = _load_latest(run)
    batches = data_lib.make_eval_batches(config, config.train.eval_batches,
                                         process_index=jax.process_index(),
                                         process_count=jax.process_count())
    ev = _evaluate(run, step_lib.make_eval_step(run.setup), state['params'], batches)
  run.writer.print(f'eval of step {step}: loss {ev["loss"]:.4f}, perplexity {ev["perplexity"]:.3f}')
  run.checkpointer.close()
  return ev


def generate(config, workdir: str) -> str:
  """--mode=generate: a batch of prompts decoded with infer.method (effjax/infer/cli.py)."""
  import sys
  from effjax.infer import cli
  return '\n'.join(cli.generate(config, workdir, sys.modules[__name__]))


MODES = {'train': train, 'eval': evaluate, 'generate': generate, 'compile_only': compile_only,
         'compress': compress_run.compress}
