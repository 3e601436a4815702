"""Decoding throughput against context length: `python -m effjax.bench decode --config=...`.

    python -m effjax.bench decode --config=configs/gla.py --contexts=1024,4096,16384,32768
        [--decode_steps=64] [--decode_batch=1] [--repeats=5]

For each context length L the model (randomly initialised from the config) gets a cache for
L + steps positions and decodes `steps` tokens from position L on, in one jitted loop of
single-token steps (the loop the sampler runs). The cache's contents do not change the cost of a
step: attention attends over all allocated slots under a mask, the recurrent mixers touch their
fixed-size state; so the timing after a real prefill of L tokens would be the same, without the
prefill's cost. Reported per row: ms per decode step (one token for each of the batch's
sequences), tokens/s (batch x steps / time), the
cache's bytes, and the tokens/s relative to the shortest context (1.0 = independent of the
context). The median of `repeats` timed loops after one warm-up.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from effjax.bench import energy
from effjax.compress import weights as w_lib
from effjax.models import attention

COLUMNS = (
    ('context', 'context', ''),
    ('batch', 'batch', ''),
    ('steps', 'steps', ''),
    ('ms_per_step', 'ms / step', '.3f'),
    ('tokens_per_s', 'tokens/s', '.0f'),
    ('relative_to_shortest', 'tokens/s vs shortest context', '.2f'),
    ('joules_per_token', 'J/token', '.3g'),
    ('mean_watts', 'power (W)', '.0f'),
    ('energy_method', 'energy from', ''),
    ('cache_mb', 'cache (MB)', '.1f'),
    ('compile_s', 'compile (s)', '.1f'),
    ('error', 'error', ''),
)


def _decode_loop(graphdef, steps: int):
  @jax.jit
  def run(params, cache, start, tokens_b):
    model = nnx.merge(graphdef, params)

    def body(i, carry):
      cache, tokens_b = carry
      logits, cache = model.decode(tokens_b, start + i, cache)
      return cache, jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.lax.fori_loop(0, steps, body, (cache, tokens_b))
  return run


def run(config, contexts: Sequence[int], *, steps: int, batch: int, repeats: int,
        log=print) -> list[dict[str, Any]]:
  from effjax.models.lm import LM
  model = LM(config.model, rngs=nnx.Rngs(config.seed))
  if not model.supports_cache():
    raise ValueError(f'model.pattern={config.model.pattern!r}: a mixer has no cached decoding')
  graphdef, params = nnx.split(model)
  rows = []
  for context in contexts:
    try:
      row = time_decode(graphdef, params, context, steps=steps, batch=batch, repeats=repeats,
                        output_major=w_lib.parse_names(config.infer.output_major),
                        qmm_output_major=w_lib.parse_names(config.infer.qmm_output_major),
                        cache_write_in_kernel=config.infer.cache_write_in_kernel,
                        output_major_kernel=w_lib.gemv_kernel(
                            config.infer.output_major_kernel))
    except Exception as e:  # pylint: disable=broad-except
      from effjax.bench.kernels import first_line
      row = {'context': context, 'batch': batch, 'steps': steps, 'error': first_line(e)}
    row['pattern'] = config.model.pattern
    rows.append(row)
    log(f"[decode] context {context}: " + (row.get('error') or
                                           f"{row['ms_per_step']:.3f} ms/step, "
                                           f"{row['tokens_per_s']:.0f} tokens/s"))
  timed = [r for r in rows if r.get('tokens_per_s')]
  base = min(timed, key=lambda r: r['context'])['tokens_per_s'] if timed else None
  for r in rows:
    if base and r.get('tokens_per_s'):
      r['relative_to_shortest'] = r['tokens_per_s'] / base
  return rows


def time_decode(graphdef, params, context: int, *, steps: int = 32, batch: int = 1,
                repeats: int = 3, profile_dir: str = '',
                output_major: tuple[str, ...] = w_lib.DECODE_OUTPUT_MAJOR,
                qmm_output_major: tuple[str, ...] = (),
                cache_write_in_kernel: bool = True,
                output_major_kernel: str = '') -> dict[str, Any]:
  """One row: decode tokens/s of given (random, trained or compressed) parameters.

  The caches hold context + steps positions and decoding starts at position `context`: one
  compile, one warm-up, then the median of `repeats` timed loops, each inside an energy meter's
  window (its inputs are ready and its output is blocked on inside the window). With
  profile_dir, one more loop is traced there and the row gets `profile_summary` (device time
  per kernel name). The weights named in `output_major` are stored transposed for the loop, as
  the decoding engine stores them (infer.output_major), and so are the weight-only quantized
  weights of the kinds in `qmm_output_major` (infer.qmm_output_major). cache_write_in_kernel
  (infer.cache_write_in_kernel): the decode-attention kernel rotates q and the new keys and
  writes the cache itself.
  output_major_kernel ('', 'triton'; w_lib.gemv_kernel(infer.output_major_kernel)): the
  output-major float weights' one-row products through the GEMV kernel.
  """
  model = nnx.merge(graphdef, params)
  if output_major or qmm_output_major or cache_write_in_kernel:
    w_lib.output_major(model, tuple(output_major), quantized=tuple(qmm_output_major),
                       kernel=output_major_kernel)
    attention.set_cache_write_in_kernel(model, cache_write_in_kernel)
    graphdef, params = nnx.split(model)
  row: dict[str, Any] = {'context': context, 'batch': batch, 'steps': steps}
  if not model.supports_cache():
    return {**row, 'error': 'a mixer of the pattern has no cached decoding'}
  cache = model.init_cache(batch, context + steps)
  row['cache_mb'] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)) / 2 ** 20
  start, tokens = jnp.int32(context), jnp.ones((batch,), jnp.int32)
  t0 = time.perf_counter()
  compiled = _decode_loop(graphdef, steps).lower(params, cache, start, tokens).compile()
  row['compile_s'] = time.perf_counter() - t0
  jax.block_until_ready(compiled(params, cache, start, tokens))
  seconds, meters = [], []
  for _ in range(repeats):
    with energy.Meter() as meter:
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(params, cache, start, tokens))
      seconds.append(time.perf_counter() - t0)
    meters.append(meter)
  if profile_dir:
    from effjax.bench.train import trace_once
    row['profile_summary'] = trace_once(lambda: compiled(params, cache, start, tokens),
                                        profile_dir)
  per_loop = statistics.median(seconds)
  row.update(ms_per_step=1e3 * per_loop / steps, tokens_per_s=batch * steps / per_loop,
             seconds=seconds, **energy.row_fields(meters, batch * steps * repeats))
  return row
