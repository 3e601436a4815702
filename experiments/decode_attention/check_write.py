"""On a GPU: the decode-attention kernel that writes the cache (decode_attention_write) against
writing with dynamic_update_slice then attending (the 'xla' path), then greedy decoding of a
random model (gpt_1b's widths, 4 layers) through the engine with infer.cache_write_in_kernel off
and on.

    python experiments/decode_attention/check_write.py [--interpret]

Per kernel case, with q and the new keys rotated before the call and rotated in the kernel
(rotary tables): the caches must be equal bit for bit (rotated in the kernel, keys within one
bf16 rounding step) and the output within bf16 rounding of the reference (relative error norm
below 2e-2). Engine: fed the same tokens, the logits with
the writing kernel must stay within 2e-2 (relative norm) of the plain kernel's at every one of 32
steps; XLA's attention is shown beside them for scale. Free-running greedy tokens are compared
too; where they differ, the line gives the top-2 logit margin at the first differing token and
the two paths' logit difference there (a near tie flipped by rounding, or not). Prints one line
per check and exits 1 if a kernel case or the teacher-forced check failed. --interpret runs the
kernels in Pallas interpret mode (CPU, slow: a dry run of the script).
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from effjax.kernels import decode_attention as da  # noqa: E402

INTERPRET = '--interpret' in sys.argv
VOCAB = 259  # a byte tokenizer's ids: the engine's heads keep these rows
CASES = (  # b, n, heads, kv heads, head dim, cache length, dtype
    (1, 1, 16, 16, 128, 1088, jnp.bfloat16),   # gpt_1b's step at 1k
    (1, 1, 16, 16, 128, 8256, jnp.bfloat16),   # ... at 8k
    (16, 1, 16, 16, 128, 1088, jnp.bfloat16),  # batch 16
    (4, 5, 32, 8, 128, 2048, jnp.bfloat16),    # GQA, a 5-token verification pass
    (2, 3, 8, 2, 64, 300, jnp.float32),        # float32, a tail block
)


def check_kernel(rng) -> bool:
  from effjax.models import rope
  ok = True
  for b, n, heads, kv, d, length, dtype in CASES:
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
    q, k_new, v_new = f(b, n, heads, d), f(b, n, kv, d), f(b, n, kv, d)
    k, v = f(b, length, kv, d), f(b, length, kv, d)
    slot = int(rng.integers(n, length - n + 1))
    start = jnp.asarray(rng.integers(0, slot + 1, b), jnp.int32)
    tables = rope.rope_tables((slot + jnp.arange(n))[None] - start[:, None], d, 10000.0)
    for rotary in (None, tables):  # q and the new keys rotated before, or in the kernel
      args = (q, k_new, v_new, k, v, start, jnp.int32(slot))
      got, want = (jax.jit(lambda *a, backend=backend: da.decode_attention_write(
          *a, rotary=rotary, backend=backend, interpret=INTERPRET and backend == 'triton'))(*args)
                   for backend in ('triton', 'xla'))
      values_same = bool(jnp.array_equal(got[2], want[2]))
      key_diff = float(jnp.max(jnp.abs(got[1].astype(jnp.float32) - want[1].astype(jnp.float32))))
      keys_same = key_diff == 0
      # rotated in the kernel, a key may round one bf16 step apart (float32 products in
      # another order); anything more is a wrong write
      keys_ok = keys_same or (rotary is not None and key_diff <= 2 ** -6 * float(
          jnp.max(jnp.abs(want[1].astype(jnp.float32)))))
      a, r = np.asarray(got[0], np.float64), np.asarray(want[0], np.float64)
      err = float(np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-30))
      good = values_same and keys_ok and err < 2e-2 and bool(np.isfinite(a).all())
      ok &= good
      keys = 'equal' if keys_same else f'within {key_diff:.1e}' if keys_ok else 'DIFFER'
      print(f'B{b} n{n} H{heads}/{kv} D{d} L{length} {jnp.dtype(dtype).name}'
            f'{" rotary in kernel" if rotary is not None else ""}: keys {keys}, values '
            f'{"equal" if values_same else "DIFFER"}, out {err:.1e} {"ok" if good else "FAIL"}',
            flush=True)
  return ok


def _model():
  from flax import nnx

  from effjax import config as config_lib
  from effjax.models.lm import LM
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if INTERPRET:  # the CPU dry run: the small default model
    config = config_lib.load_file(os.path.join(root, 'configs/default.py'))
  else:
    config = config_lib.load_file(os.path.join(root, 'configs/gpt_1b.py'))
    config = config_lib.apply_overrides(config, ['model.num_layers=4'])
  return nnx.split(LM(config.model, rngs=nnx.Rngs(0)))


def _forced_logits(split, tokens_bt, start_b, forced_bs, kernel: str, write: bool) -> np.ndarray:
  """Logits [S, B, V] of S steps through the engine, each step fed the given token (the same
  inputs whatever the attention path, so the logits differ by rounding alone)."""
  from effjax.infer.engine import Engine
  engine = Engine(*split, '', kernel, INTERPRET, vocab_limit=VOCAB, cache_write_in_kernel=write)
  a = engine.arrays
  b, t = tokens_bt.shape
  caches = engine.init_cache(b, t + forced_bs.shape[0] + 8)
  start_b = jnp.asarray(start_b)
  _, _, caches = jax.jit(lambda a, x, s, c: engine.prefill(a, x, s, c, True))(
      a, jnp.asarray(tokens_bt), start_b, caches)

  @functools.partial(jax.jit, donate_argnums=(3,))
  def step(a, token_b, slot, caches):
    x, caches, _ = engine.run(a, 0, engine.num_layers, engine.embed(a, token_b[:, None]), slot,
                              start_b, caches)
    return engine.head(a, x)[:, 0].astype(jnp.float32), caches

  out = []
  for i, token_b in enumerate(forced_bs):
    logits, caches = step(a, jnp.asarray(token_b), jnp.int32(t + i), caches)
    out.append(np.asarray(logits))
  return np.stack(out)


def check_decoding(rng) -> bool:
  """The engine with the writing kernel against the engine with the plain kernel (and XLA's
  attention, for scale): teacher-forced logits over 32 steps must agree to bf16 rounding at
  every step (a cache written wrongly would show as a jump that stays); then free-running greedy
  tokens, where a difference is reported with the top-2 logit margin at the first step that
  differs (a near tie that rounding flips, or not)."""
  from effjax.infer import generate as gen
  from effjax.infer.sampling import Sampler
  split = _model()
  prompts = [[int(t) for t in rng.integers(3, VOCAB, m)] for m in (7, 30, 100)]
  options = gen.Options(max_new_tokens=32, sampler=Sampler(vocab_limit=VOCAB))
  tokens_bt, start_b = gen.Decoder(*split, options).pad(prompts)
  forced = rng.integers(3, VOCAB, (32, len(prompts)))
  logits = {name: _forced_logits(split, tokens_bt, start_b, forced, kernel, write)
            for name, kernel, write in (('off', 'triton', False), ('on', 'triton', True),
                                        ('xla', 'xla', False))}
  rel = lambda x, y: np.linalg.norm(x - y, axis=(1, 2)) / np.linalg.norm(y, axis=(1, 2))
  on_off, off_xla = rel(logits['on'], logits['off']), rel(logits['off'], logits['xla'])
  good = bool(np.isfinite(logits['on']).all() and on_off.max() < 2e-2)
  print(f'teacher-forced logits, batch 3 (left-padded), 32 steps: '
        f'on vs off rel err max {on_off.max():.1e} (steps 0, 8, 16, 24: {" ".join(f"{x:.1e}" for x in on_off[::8])}), '
        f'off vs xla max {off_xla.max():.1e} {"ok" if good else "FAIL"}', flush=True)

  for batch in (prompts[:1], prompts):
    runs = {}
    for on in (False, True):
      options = gen.Options(max_new_tokens=32, sampler=Sampler(vocab_limit=VOCAB),
                            cache_write_in_kernel=on, attention_kernel='triton',
                            attention_interpret=INTERPRET)
      runs[on] = gen.Decoder(*split, options).generate(batch).tokens
    if runs[False] == runs[True]:
      print(f'greedy decoding, batch {len(batch)}, 32 tokens: same tokens', flush=True)
      continue
    row = next(i for i, (x, y) in enumerate(zip(runs[False], runs[True])) if x != y)
    step = next(i for i, (x, y) in enumerate(zip(runs[False][row], runs[True][row])) if x != y)
    # the logits at that step, fed the common prefix (identical in both runs up to it)
    prefix = np.asarray(runs[False][row][:step], np.int64).reshape(step, 1)
    one_t, one_s = gen.Decoder(*split, options).pad([batch[row]])
    first = {on: _forced_logits(split, one_t, one_s, prefix, 'triton', on) if step else None
             for on in (False, True)}
    if step:
      top2 = np.sort(first[False][-1, 0])[-2:]
      diff = np.abs(first[True][-1, 0] - first[False][-1, 0]).max()
      why = f'top-2 logit margin there {top2[1] - top2[0]:.2e}, on vs off logit diff {diff:.2e}'
    else:
      why = 'at the first token (after the prompt: prefill, no decode step yet)'
    print(f'greedy decoding, batch {len(batch)}, 32 tokens: row {row} differs from token {step} '
          f'({why})', flush=True)
  return good


def main():
  print(f'{jax.devices()[0].device_kind}, JAX {jax.__version__}', flush=True)
  rng = np.random.default_rng()
  ok = check_kernel(rng)
  ok &= check_decoding(rng)
  print('all ok' if ok else 'FAILED', flush=True)
  sys.exit(0 if ok else 1)


if __name__ == '__main__':
  main()
