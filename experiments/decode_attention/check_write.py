"""On a GPU: the decode-attention kernel that writes the cache (decode_attention_write) against
writing with dynamic_update_slice then attending (the 'xla' path), then greedy decoding of a
random model through the engine with infer.cache_write_in_kernel off and on.

    python experiments/decode_attention/check_write.py

Per case: the caches must be equal bit for bit and the output within bf16 rounding of the
reference (relative error norm below 2e-2); the two decodings must give the same tokens.
Prints one line per check and exits 1 if any failed.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from effjax.kernels import decode_attention as da  # noqa: E402

CASES = (  # b, n, heads, kv heads, head dim, cache length, dtype
    (1, 1, 16, 16, 128, 1088, jnp.bfloat16),   # gpt_1b's step at 1k
    (1, 1, 16, 16, 128, 8256, jnp.bfloat16),   # ... at 8k
    (16, 1, 16, 16, 128, 1088, jnp.bfloat16),  # batch 16
    (4, 5, 32, 8, 128, 2048, jnp.bfloat16),    # GQA, a 5-token verification pass
    (2, 3, 8, 2, 64, 300, jnp.float32),        # float32, a tail block
)


def check_kernel(rng) -> bool:
  ok = True
  for b, n, heads, kv, d, length, dtype in CASES:
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
    q, k_new, v_new = f(b, n, heads, d), f(b, n, kv, d), f(b, n, kv, d)
    k, v = f(b, length, kv, d), f(b, length, kv, d)
    slot = int(rng.integers(n, length - n + 1))
    start = jnp.asarray(rng.integers(0, slot + 1, b), jnp.int32)
    got = jax.jit(lambda *a: da.decode_attention_write(*a, backend='triton'))(
        q, k_new, v_new, k, v, start, jnp.int32(slot))
    want = jax.jit(lambda *a: da.decode_attention_write(*a, backend='xla'))(
        q, k_new, v_new, k, v, start, jnp.int32(slot))
    same = all(bool(jnp.array_equal(g, w)) for g, w in zip(got[1:], want[1:]))
    a, r = np.asarray(got[0], np.float64), np.asarray(want[0], np.float64)
    err = float(np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-30))
    good = same and err < 2e-2 and bool(np.isfinite(a).all())
    ok &= good
    print(f'B{b} n{n} H{heads}/{kv} D{d} L{length} {jnp.dtype(dtype).name}: caches '
          f'{"equal" if same else "DIFFER"}, out {err:.1e} {"ok" if good else "FAIL"}', flush=True)
  return ok


def check_decoding(rng) -> bool:
  from flax import nnx

  from effjax import config as config_lib
  from effjax.infer import generate as gen
  from effjax.infer.sampling import Sampler
  from effjax.models.lm import LM
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  config = config_lib.load_file(os.path.join(root, 'configs/gpt_1b.py'))
  config = config_lib.apply_overrides(config, ['model.num_layers=4'])
  split = nnx.split(LM(config.model, rngs=nnx.Rngs(0)))
  prompts = [[int(t) for t in rng.integers(3, 259, m)] for m in (7, 30, 100)]
  tokens = {}
  for on in (False, True):
    options = gen.Options(max_new_tokens=32, sampler=Sampler(vocab_limit=259),
                          cache_write_in_kernel=on)
    tokens[on] = [gen.Decoder(*split, options).generate(p).tokens for p in (prompts[:1], prompts)]
  good = tokens[False] == tokens[True]
  print(f'greedy decoding, gpt_1b widths x 4 layers, batch 1 and 3, 32 tokens: '
        f'{"same tokens" if good else "DIFFERENT tokens"} {"ok" if good else "FAIL"}', flush=True)
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
