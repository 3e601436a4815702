"""Decoding rows per method: `python -m effjax.bench decode --methods=plain,early_exit,...`.

For each (context, method) the engine (effjax/infer/engine.py: weights cast once to the decoding
dtype, one jitted loop, the cache donated) decodes `steps` tokens per sequence from position
`context` on, as bench/decode.py does (the cache's contents do not change a step's cost). Per row:
  - ms per token (per sequence: the loop's time / tokens each sequence got);
  - bytes read per generated token: the weights of the layers run plus the cache they read (an
    attention layer reads its whole allocated key/value cache: the decode attention runs over
    every slot under a mask; a recurrent layer its state). Early exit counts, per token, the
    layers up to its exit, the exit heads asked, the deeper layers' key/value projections and
    the head; speculative methods count a round (gamma + 1 draft steps, one verification pass)
    divided by the tokens the round produced;
  - the measured memory bandwidth (a large device copy timed in the same run, read + write) and
    the fraction of that roofline the row reached (bytes per token / seconds per token / bandwidth);
    beside it the bandwidth of reading alone (a sum over the same array) and the fraction of
    that: a decode step mostly reads, and a GPU may read faster than it copies, so the second
    fraction is the stricter one;
  - speculative rows: acceptance rate (accepted / drafted) and tokens per round; early exit: the
    fraction of tokens that left early; every row: speedup = plain's ms per token / its own.
Weights are random unless --target_workdir / --draft_workdir name trained checkpoints: a random
model's acceptance and exit rates say nothing about a trained one's (the timing mechanics do).
"""

from __future__ import annotations

import os
import re
import statistics
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effjax.compress import weights as w_lib
from effjax.infer import exit_decode, speculative
from effjax.infer.engine import Engine
from effjax.infer.exit_decode import ExitPolicy
from effjax.infer.sampling import Sampler

METHODS = ('plain', 'early_exit', 'self_speculative', 'speculative')
COLUMNS = (
    ('method', 'method', ''),
    ('context', 'context', ''),
    ('batch', 'batch', ''),
    ('ms_per_token', 'ms / token', '.3f'),
    ('tokens_per_s', 'tokens/s', '.0f'),
    ('speedup_vs_plain', 'speedup vs plain', '.2f'),
    ('mb_per_token', 'MB read / step', '.2f'),
    ('bandwidth_gbs', 'copy bandwidth (GB/s)', '.1f'),
    ('roofline_fraction', 'of roofline', '.2f'),
    ('read_bandwidth_gbs', 'read bandwidth (GB/s)', '.1f'),
    ('read_roofline_fraction', 'of read roofline', '.2f'),
    ('acceptance_rate', 'acceptance', '.3f'),
    ('tokens_per_round', 'tokens / round', '.2f'),
    ('exit_fraction', 'exited early', '.3f'),
    ('compile_s', 'compile (s)', '.1f'),
    ('error', 'error', ''),
)


def _median_seconds(f, x, repeats: int) -> float:
  jax.block_until_ready(f(x))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(x))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


# The bandwidth probes over a large float32 array: (function, bytes moved per entry): an
# elementwise pass (read + write) and a sum (reads only; the output is one number).
BANDWIDTH_PROBES = {'copy': (lambda x: x * 1.0001, 8), 'read': (jnp.sum, 4)}


def _probe_array(megabytes: int) -> jax.Array:
  return jnp.ones((megabytes * 2 ** 20 // 4,), jnp.float32)


def measure_bandwidth(megabytes: int = 512, repeats: int = 10) -> float:
  """Bytes/s of the copy probe (reads + writes counted)."""
  fn, per_entry = BANDWIDTH_PROBES['copy']
  x = _probe_array(megabytes)
  return per_entry * x.size / _median_seconds(jax.jit(fn), x, repeats)


def measure_read_bandwidth(megabytes: int = 512, repeats: int = 10) -> float:
  """Bytes/s of the read probe (reads only)."""
  fn, per_entry = BANDWIDTH_PROBES['read']
  x = _probe_array(megabytes)
  return per_entry * x.size / _median_seconds(jax.jit(fn), x, repeats)


def _bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _kv_weight_bytes(engine, i: int) -> int:
  block = engine.arrays['blocks'][i]
  if not engine.is_attention[i]:
    return _bytes(block['mixer'])  # a recurrent state still advances: its projections run
  return _bytes(block['mixer']['wk']) + _bytes(block['mixer']['wv'])


def step_bytes(engine, caches, exit_index: int | None = None, asked: int = 0) -> int:
  """Bytes one token reads: full depth, or leaving at exit `exit_index` (propagated caches).

  Every exit asked applies an output projection (its own, or the shared head again: at decoding
  sizes a head is far larger than the L2 cache, so a second application reads it again): a token
  leaving at exit e asked e + 1 exits; one going full depth with `asked` exits asked reads the
  head asked + 1 times.
  """
  head = engine.param_bytes(0, 0, head=True)
  if exit_index is None:
    return engine.param_bytes(head=False) + head * (asked + 1) + _bytes(caches)
  layer = engine.exits[exit_index]
  deeper = sum(_kv_weight_bytes(engine, i) for i in range(layer, engine.num_layers))
  return (engine.param_bytes(0, layer, head=False) + head * (exit_index + 1) + deeper +
          _bytes(caches[:layer]))


# The infer options that change how the engine is built (what --alternate may compare).
ENGINE_OPTIONS = ('weights_dtype', 'attention_kernel', 'output_major', 'qmm_output_major',
                  'cache_write_in_kernel', 'output_major_kernel', 'fold_norms',
                  'decode_attention_tiling')


def make_engine(config, split) -> Engine:
  """The decoding engine for (graphdef, params) `split` as config.infer says (ENGINE_OPTIONS)."""
  infer = config.infer
  return Engine(*split, infer.weights_dtype, infer.attention_kernel,
                output_major=w_lib.parse_names(infer.output_major),
                qmm_output_major=w_lib.parse_names(infer.qmm_output_major),
                cache_write_in_kernel=infer.cache_write_in_kernel,
                output_major_kernel=w_lib.gemv_kernel(infer.output_major_kernel),
                fold_norms=infer.fold_norms, attention_tiling=infer.decode_attention_tiling)


def _program(method, engine, draft, steps, gamma, policy, exit_index):
  sampler = Sampler()

  def run(a, da, t_caches, d_caches, slot, tokens_b, key):
    start = jnp.zeros(tokens_b.shape, jnp.int32)
    if method in ('plain', 'early_exit'):
      def body(i, carry):
        caches, tok, hist = carry
        if method == 'plain':
          x, caches, _ = engine.run(a, 0, engine.num_layers, engine.embed(a, tok[:, None]),
                                    slot + i, start, caches)
          nxt, where = sampler.sample(engine.head(a, x)[:, 0], key), jnp.zeros_like(tok)
        else:
          nxt, where, caches = exit_decode.step(engine, a, tok, slot + i, start, caches, policy,
                                                sampler, jax.random.fold_in(key, i))
        hist = hist + jnp.sum(jax.nn.one_hot(where, len(engine.exits) + 1, dtype=jnp.int32), 0)
        return caches, nxt, hist

      hist = jnp.zeros((len(engine.exits) + 1,), jnp.int32)
      caches, _, hist = jax.lax.fori_loop(0, steps, body, (t_caches, tokens_b, hist))
      return caches, d_caches, {'exit_histogram': hist}
    _, stats = speculative.continue_loop(
        engine, a, t_caches, d_caches, tokens_b, slot, start, key, max_new=steps, gamma=gamma,
        sampler=sampler, stop_ids=(-1,), draft=draft, da=da, exit_index=exit_index)
    return t_caches, d_caches, stats

  return jax.jit(run, donate_argnums=(2, 3))


def run(config, contexts: Sequence[int], methods: Sequence[str], *, steps: int, batch: int,
        repeats: int, params=None, draft_config=None, draft_params=None, gamma: int = 4,
        exit_threshold: float = 0.9, bandwidth_mb: int = 512, profile_dir: str = '',
        log=print) -> list[dict[str, Any]]:
  """One row per (context, method); params / draft_params: trained (graphdef, params) or None.

  With profile_dir, one more call of each row's program is traced with jax.profiler (after the
  timed ones) into profile_dir/<method>_<context>, and the row gets `profile_summary`: device
  time per kernel name, what a step spends its time on.
  """
  from effjax.models.lm import LM
  bandwidth = measure_bandwidth(bandwidth_mb)
  read_bandwidth = measure_read_bandwidth(bandwidth_mb)
  log(f'[decode] copy bandwidth {bandwidth / 1e9:.1f} GB/s, read {read_bandwidth / 1e9:.1f} GB/s')
  split = params or nnx.split(LM(config.model, rngs=nnx.Rngs(config.seed)))
  engine = make_engine(config, split)
  draft = None
  if 'speculative' in methods:
    if draft_params is None:
      draft_params = nnx.split(LM((draft_config or config).model, rngs=nnx.Rngs(config.seed + 1)))
    draft = make_engine(config, draft_params)
  policy = ExitPolicy(exit_threshold, config.infer.confidence, config.infer.exit_skip)
  rows = []
  for context in contexts:
    plain_ms = None
    for method in methods:
      row: dict[str, Any] = {'method': method, 'context': context, 'batch': batch,
                             'steps': steps, 'gamma': gamma, 'pattern': config.model.pattern,
                             'bandwidth_gbs': bandwidth / 1e9,
                             'read_bandwidth_gbs': read_bandwidth / 1e9}
      try:
        if method in ('early_exit', 'self_speculative') and not engine.exits:
          raise ValueError(f'infer.method={method} needs model.exit_layers')
        length = context + steps + 2 * (gamma + 1)
        uses_draft = method == 'speculative'
        new_caches = lambda: (engine.init_cache(batch, length, gamma + 1),
                              draft.init_cache(batch, length, gamma + 1) if uses_draft else None)
        program = _program(method, engine, draft if uses_draft else None, steps, gamma, policy,
                           0 if method == 'self_speculative' else None)
        da = draft.arrays if uses_draft else None
        args = lambda c: (engine.arrays, da, *c, jnp.int32(context),
                          jnp.ones((batch,), jnp.int32), jax.random.key(0))
        t0 = time.perf_counter()
        compiled = program.lower(*args(new_caches())).compile()
        row['compile_s'] = time.perf_counter() - t0
        caches = new_caches()
        _, _, stats = jax.block_until_ready(compiled(*args(caches)))
        seconds = []
        for _ in range(repeats):
          caches = new_caches()  # donated: a fresh one each call (outside the timed window)
          jax.block_until_ready(caches)
          t0 = time.perf_counter()
          _, _, stats = jax.block_until_ready(compiled(*args(caches)))
          seconds.append(time.perf_counter() - t0)
        if profile_dir:
          from effjax.bench.train import trace_once
          caches = jax.block_until_ready(new_caches())
          row['profile_summary'] = trace_once(
              lambda: compiled(*args(caches)), os.path.join(profile_dir, f'{method}_{context}'))
        stats = {k: jax.device_get(v).tolist() for k, v in stats.items()}
        made = stats['tokens'] - 1 if 'tokens' in stats else steps  # per sequence
        per_token = statistics.median(seconds) / made
        t_caches, d_caches = new_caches()
        if method == 'plain':
          per_token_bytes = step_bytes(engine, t_caches)
        elif method == 'early_exit':
          hist = stats['exit_histogram']
          per_token_bytes = sum(
              n * (step_bytes(engine, t_caches, asked=len(engine.exits)) if e == len(engine.exits)
                   else step_bytes(engine, t_caches, e))
              for e, n in enumerate(hist)) / max(sum(hist), 1)
          row['exit_fraction'] = 1 - hist[-1] / max(sum(hist), 1)
        else:
          rounds = max(stats['rounds'], 1)
          produced = (stats['tokens'] - 1) / rounds  # per sequence; the first was pending
          if uses_draft:
            draft_step = step_bytes(draft, d_caches) - draft.param_bytes(0, 0, head=True)
            round_bytes = (gamma + 1) * draft_step + gamma * draft.param_bytes(0, 0, head=True)
          else:
            layer = engine.exits[0]
            round_bytes = (gamma + 1) * (engine.param_bytes(0, layer, head=False) +
                                         _bytes(t_caches[:layer]))
            round_bytes += gamma * engine.param_bytes(0, 0, head=True)
          round_bytes += step_bytes(engine, t_caches)  # the verification pass reads it all once
          per_token_bytes = round_bytes / produced
          row['acceptance_rate'] = stats['accepted'] / max(stats['drafted'], 1)
          row['tokens_per_round'] = produced
        row.update(ms_per_token=1e3 * per_token, tokens_per_s=batch / per_token,
                   seconds=seconds, stats=stats, mb_per_token=per_token_bytes / 2 ** 20,
                   roofline_fraction=per_token_bytes / per_token / bandwidth,
                   read_roofline_fraction=per_token_bytes / per_token / read_bandwidth)
        if method == 'plain':
          plain_ms = row['ms_per_token']
        if plain_ms:
          row['speedup_vs_plain'] = plain_ms / row['ms_per_token']
      except Exception as e:  # pylint: disable=broad-except
        from effjax.bench.kernels import first_line
        row['error'] = first_line(e)
      rows.append(row)
      log(f"[decode] {method} context {context}: " + (
          row.get('error') or f"{row['ms_per_token']:.3f} ms/token, "
          f"{row['roofline_fraction']:.2f} of roofline"))
  return rows


def _alternate_columns():
  """The method rows' columns for --alternate: the variant first, then the timing columns, the
  speedup over the first variant and its spread (as bench train --alternate gives them)."""
  from effjax.bench.train import ALTERNATE_COLUMNS as SPEEDUP
  by_key = {c[0]: c for c in COLUMNS}
  pick = lambda *keys: tuple(by_key[k] for k in keys)
  return ((('variant', 'variant', ''),) + pick('context', 'batch', 'ms_per_token', 'tokens_per_s')
          + SPEEDUP[:2] + pick('mb_per_token', 'bandwidth_gbs', 'roofline_fraction',
                               'read_bandwidth_gbs', 'read_roofline_fraction')
          + SPEEDUP[2:] + pick('compile_s', 'error'))


ALTERNATE_COLUMNS = _alternate_columns()


def alternate_configs(config, specs: Sequence[str]) -> list[tuple[str, Any]]:
  """['infer.OPTION=V1,V2,...', ...] -> [(label, config with those values), ...] (--alternate,
  repeatable: the lists zipped, the i-th variant taking each list's i-th value; values split
  on '/' instead where one holds commas: infer.output_major=wo/wo,w_down). Every OPTION must be
  one of ENGINE_OPTIONS; at least two variants, all different, each valid for the config."""
  from effjax.bench.train import alternate_configs as variant_configs
  for spec in specs:
    key, sep, _ = spec.partition('=')
    section, _, option = key.strip().partition('.')
    if not sep or section != 'infer' or option not in ENGINE_OPTIONS:
      raise ValueError(f'--alternate={spec!r}: expected infer.OPTION=V1,V2,... with OPTION one '
                       f'of {", ".join(ENGINE_OPTIONS)} (the options that change the engine)')
  return [(' '.join(f'{k.split(".", 1)[1]}={v or repr(v)}' for k, v in variant.items()), changed)
          for variant, changed in variant_configs(config, specs)]


def alternate(config, contexts: Sequence[int], specs: Sequence[str], *, steps: int, batch: int,
              rounds: int, params=None, bandwidth_mb: int = 512, profile_dir: str = '',
              log=print) -> list[dict[str, Any]]:
  """Plain decoding with each variant of engine options (`specs`: alternate_configs), timed in
  alternation in one process (effjax.bench.kernels.time_interleaved) beside the bandwidth
  probes (the copy and the read-only sum over a bandwidth_mb array), so a clock or bandwidth
  that drifts during the run moves every variant and the roofline alike. One row per (context,
  value): the median round's ms per token, the median over rounds of the first value's loop
  time / this one's (speedup_vs_first, with the rounds' 25th-75th percentiles), and the roofline
  fractions as medians of per-round fractions (this round's bytes per second / this round's
  probe). A value whose loop fails to compile is a row with its error; if it is the first, no
  row gets a speedup. With profile_dir, one more loop of each row is traced into
  profile_dir/<label>_<context>.
  """
  from effjax.bench.kernels import first_line, spread_text, time_interleaved
  if rounds < 1:
    raise ValueError(f'need at least one round; got {rounds}')
  from effjax.models.lm import LM
  variants = alternate_configs(config, specs)
  split = params or nnx.split(LM(config.model, rngs=nnx.Rngs(config.seed)))
  engines = {label: make_engine(variant, split) for label, variant in variants}
  gamma = config.infer.gamma
  probe = _probe_array(bandwidth_mb)
  probes = {name: (jax.jit(fn).lower(probe).compile(), per_entry * probe.size)
            for name, (fn, per_entry) in BANDWIDTH_PROBES.items()}
  rows = []
  for context in contexts:
    length = context + steps + 2 * (gamma + 1)  # as run()'s rows allocate
    compiled, made, errors = {}, {}, {}
    for label, engine in engines.items():
      make = lambda e=engine: (e.arrays, None, e.init_cache(batch, length, gamma + 1), None,
                               jnp.int32(context), jnp.ones((batch,), jnp.int32),
                               jax.random.key(0))
      try:
        t0 = time.perf_counter()
        compiled[label] = _program('plain', engine, None, steps, 0, None, None).lower(
            *make()).compile()
        made[label] = (make, time.perf_counter() - t0)
      except Exception as e:  # pylint: disable=broad-except
        errors[label] = first_line(e)
    for name, (fn, _) in probes.items():
      compiled[name] = fn
    timed = {}
    if made:  # the ratios' baseline is the first value; if it failed, no row gets a speedup
      timed = time_interleaved(
          compiled, lambda name: (probe,) if name in probes else made[name][0](), rounds,
          baseline=next(iter(made)), seed=context)
    first_ok = next(iter(engines)) in made
    for label, engine in engines.items():
      row: dict[str, Any] = {'method': 'plain', 'variant': label, 'context': context,
                             'batch': batch, 'steps': steps, 'rounds': rounds,
                             'pattern': config.model.pattern}
      if label in errors:
        rows.append(dict(row, error=errors[label]))
        log(f'[decode] {label} context {context}: {errors[label]}')
        continue
      t = timed[label]
      loop_s = np.asarray(t['rounds_ms']) / 1e3
      per_step = step_bytes(engine, jax.eval_shape(
          lambda e=engine: e.init_cache(batch, length, gamma + 1)))
      for key, name in (('', 'copy'), ('read_', 'read')):
        probe_s = np.asarray(timed[name]['rounds_ms']) / 1e3
        row[f'{key}bandwidth_gbs'] = float(np.median(probes[name][1] / probe_s)) / 1e9
        row[f'{key}roofline_fraction'] = float(np.median(
            per_step * steps / loop_s / (probes[name][1] / probe_s)))
      per_token = float(np.median(loop_s)) / steps
      row.update(ms_per_token=1e3 * per_token, tokens_per_s=batch / per_token,
                 seconds=loop_s.tolist(), mb_per_token=per_step / 2 ** 20,
                 compile_s=made[label][1])
      if first_ok:
        row.update(speedup_vs_first=t['ratio'], speedup_spread=spread_text(t))
      if profile_dir:
        from effjax.bench.train import trace_once
        args = jax.block_until_ready(made[label][0]())
        row['profile_summary'] = trace_once(
            lambda: compiled[label](*args),
            os.path.join(profile_dir, re.sub(r'[^A-Za-z0-9_.-]+', '_', label) + f'_{context}'))
      rows.append(row)
      log(f"[decode] {label} context {context}: {row['ms_per_token']:.3f} ms/token, "
          f"{row.get('speedup_vs_first', float('nan')):.3f}x the first "
          f"[{row.get('speedup_spread', '-')}], {row['roofline_fraction']:.3f} of roofline")
  return rows
