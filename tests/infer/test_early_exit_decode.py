"""Early-exit decoding: threshold 1.0 (never exit) equals plain decoding; after a token exits,
every deeper layer's cache holds the key and value of its propagated hidden state; the batch-1
skip path equals computing every layer; per-sequence exits in a batch equal each sequence alone."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effjax.infer import exit_decode
from effjax.infer import generate as gen
from effjax.infer.engine import Engine
from effjax.infer.exit_decode import ExitPolicy
from effjax.infer.sampling import Sampler
from effjax.models import lm as lm_lib
from tests.helpers import tiny_config


def _split(**overrides):
  config = tiny_config(**{**dict(init_std=0.1, num_layers=4, exit_layers='1,2',
                                  exit_head='shared', ssm_state_dim=8, ssm_head_dim=16,
                                  scan_chunk=4), **overrides})
  return nnx.split(lm_lib.LM(config.model, rngs=nnx.Rngs(0)))


def _decoder(split, method='early_exit', **policy):
  options = gen.Options(method=method, max_new_tokens=10, sampler=Sampler(vocab_limit=259),
                        exit_policy=ExitPolicy(**policy))
  return gen.Decoder(*split, options)  # compiles once per batch shape, reused across prompts


def _decode(split, prompts, method='early_exit', **policy):
  return _decoder(split, method, **policy).generate(prompts)


def test_threshold_one_equals_plain():
  split = _split(pattern='attention:mlp, gla:mlp')
  prompts = [[5, 9, 11], [7, 8, 9, 10, 11, 12, 13]]
  plain = _decode(split, prompts, method='plain').tokens
  never = _decode(split, prompts, threshold=1.0)
  assert never.tokens == plain
  assert never.stats['exit_histogram'] == [0, 0, 2 * 9]  # every token went to full depth


def test_cache_after_an_exit_holds_every_layer():
  graphdef, params = _split(pattern='attention:mlp')
  engine = Engine(graphdef, params)
  a = engine.arrays
  tokens = jnp.asarray([[3, 4, 5, 6]])
  start = jnp.zeros((1,), jnp.int32)

  @jax.jit
  def one_step(a):
    caches = engine.init_cache(1, 8)
    _, _, caches = engine.prefill(a, tokens, start, caches, False)
    h1, _, _ = engine.run(a, 0, 1, engine.embed(a, jnp.asarray([[7]])), 4, start,
                          caches)  # the exit's hidden state
    policy = ExitPolicy(threshold=-1.0)  # always exit at the first exit (after layer 1)
    _, where, caches = exit_decode.step(engine, a, jnp.asarray([7]), 4, start, caches, policy,
                                        Sampler(), jax.random.key(0))
    expected = []
    for i in range(1, engine.num_layers):  # deeper layers: keys of norm_i(h1) at position 4
      block = engine.block(a, i)
      _, k, v = block.mixer._qkv(block.mixer_norm(h1), jnp.full((1, 1), 4))
      expected.append((k[:, 0], v[:, 0]))
    return where, caches, expected

  where, caches, expected = one_step(a)
  assert int(where[0]) == 0
  for i, cache in enumerate(caches):
    assert np.abs(np.asarray(cache['k'][:, 4])).sum() > 0  # written in every layer
    assert not np.asarray(cache['k'][:, 5:]).any()
  for (k, v), cache in zip(expected, caches[1:]):
    np.testing.assert_allclose(cache['k'][:, 4], k, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cache['v'][:, 4], v, rtol=1e-5, atol=1e-6)


def test_skip_path_equals_selecting_and_batch_rows_equal_each_alone():
  split = _split(pattern='attention:mlp, mamba2:mlp')
  prompts = [[5, 9, 11], [7, 8, 9, 10, 11, 12, 13]]
  for confidence, threshold in (('softmax', 0.0), ('state', 0.5), ('margin', 0.002)):
    policy = dict(confidence=confidence, threshold=threshold)
    skipping, selecting = _decoder(split, **policy), _decoder(split, skip=False, **policy)
    batch = skipping.generate(prompts)
    assert batch.tokens == selecting.generate(prompts).tokens
    for prompt, row in zip(prompts, batch.tokens):
      alone = skipping.generate([prompt])
      assert alone.tokens[0] == row
      assert alone.tokens[0] == selecting.generate([prompt]).tokens[0]
  assert sum(batch.stats['exit_histogram'][:2]) > 0  # some tokens did exit early
