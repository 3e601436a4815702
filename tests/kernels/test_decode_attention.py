"""Decode attention: the reference against the decoding engine's masked attention and a per-row
loop, the Triton kernel in interpret mode against the reference on random caches (GQA, several
new tokens, left-padded rows, cache lengths that are not whole blocks, split ranges that see
nothing, bf16 and float32), the engine decoding through the kernel token for token like XLA, shape
errors, backend choice, and the kernel lowered for CUDA on this CPU machine. The variant that
writes the new keys and values into the cache itself (decode_attention_write) against writing
then attending: the same caches bit for bit, the same outputs, in the engine and LM.decode; and
with the rotary embedding applied in the kernel, the same as rotating first."""

import re

import jax
import jax.numpy as jnp

import numpy as np
import pytest

from effjax.infer import engine as engine_lib
from effjax.infer import generate as gen
from effjax.infer.sampling import Sampler
from effjax.kernels import decode_attention as da
from effjax.kernels.decode_attention import decode_attention, decode_attention_reference


def _inputs(rng, b, n, heads, kv, d, length, dtype):
  """Random queries and cache, random left padding, a slot with room for the n new tokens."""
  f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
  slot = int(rng.integers(n, length - n + 1))
  start = jnp.asarray(rng.integers(0, slot + 1, b), jnp.int32)
  return f(b, n, heads, d), f(b, length, kv, d), f(b, length, kv, d), start, slot


def test_reference_equals_the_engines_masked_attention_and_a_loop():
  rng = np.random.default_rng()
  q, k, v, start, slot = _inputs(rng, 3, 4, 6, 2, 16, 40, jnp.float32)
  ref = decode_attention_reference(q, k, v, start, slot)
  mask = da.allowed_slots(start, jnp.int32(slot), 4, 40)
  np.testing.assert_allclose(ref, engine_lib.attention_parts(q, [(k, v, mask)]), atol=1e-5)
  qn, kn, vn = (np.asarray(t, np.float64) for t in (q, k, v))
  for b in range(3):
    for i in range(4):
      for h in range(6):
        keys = slice(int(start[b]), slot + i + 1)
        s = kn[b, keys, h // 3] @ qn[b, i, h] / 4.0
        p = np.exp(s - s.max())
        want = (p / p.sum()) @ vn[b, keys, h // 3]
        np.testing.assert_allclose(ref[b, i, h], want, atol=1e-5)


@pytest.mark.parametrize('b,n,heads,kv,d,length,dtype,tiling', [
    (2, 1, 4, 4, 32, 70, jnp.float32, (16, 3)),       # MHA, a tail block, split
    (3, 5, 8, 2, 64, 128, jnp.bfloat16, (32, 2)),     # GQA x 5 new tokens (a verify pass)
    (1, 1, 16, 16, 128, 1098, jnp.bfloat16, None),    # gpt_1b's step, the default tiling
    (2, 3, 4, 1, 16, 50, jnp.float32, (16, 4)),       # one kv head, ranges past the last slot
    (1, 2, 8, 2, 32, 200, jnp.bfloat16, '32:auto:8:3'),  # a tiling spec: warps, stages
    (2, 3, 8, 2, 32, 100, jnp.float32, (32, 1)),      # one range: normalised in the kernel,
    (2, 1, 4, 4, 32, 70, jnp.bfloat16, (16, 1)),      # no merge (padded rows / one row each)
    (2, 1, 4, 2, 32, 90, jnp.float32, '16:64'),       # a spec's split capped at the blocks
])
def test_kernel_matches_reference(b, n, heads, kv, d, length, dtype, tiling):
  rng = np.random.default_rng()
  q, k, v, start, slot = _inputs(rng, b, n, heads, kv, d, length, dtype)
  want = decode_attention_reference(q, k, v, start, slot)
  got = jax.jit(lambda *a: decode_attention(*a, backend='triton', tiling=tiling,
                                             interpret=True))(q, k, v, start, jnp.int32(slot))
  assert got.shape == want.shape and got.dtype == want.dtype
  tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=tol, rtol=tol)


@pytest.mark.parametrize('start,slot,n,length,tiling', [
    ((7, 0), 7, 1, 40, (16, 3)),     # a row whose only key is its own token (start == slot)
    ((16, 3), 16, 2, 50, (16, 4)),   # start on a range boundary; the last range sees nothing
    ((0, 5), 45, 5, 50, (16, 2)),    # the cache full to its last slot, a partial tail block
    ((2, 2), 2, 3, 64, (16, 4)),     # early in a generation: three of four ranges see nothing
])
def test_kernel_edge_cases(start, slot, n, length, tiling):
  rng = np.random.default_rng()
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  q, k, v = f(2, n, 4, 32), f(2, length, 2, 32), f(2, length, 2, 32)
  start = jnp.asarray(start, jnp.int32)
  got = decode_attention(q, k, v, start, slot, backend='triton', tiling=tiling, interpret=True)
  want = decode_attention_reference(q, k, v, start, slot)
  assert np.all(np.isfinite(np.asarray(got)))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('b,n,heads,kv,d,length,dtype,tiling', [
    (2, 1, 4, 4, 32, 70, jnp.float32, (16, 3)),       # MHA, a tail block, split
    (3, 5, 8, 2, 64, 128, jnp.bfloat16, (32, 2)),     # GQA x 5 new tokens (a verify pass)
    (1, 1, 16, 16, 128, 1098, jnp.bfloat16, None),    # gpt_1b's step, the default tiling
    (3, 2, 8, 2, 32, 90, jnp.float32, (16, 1)),       # one range: no merge, padded rows
    (2, 3, 4, 1, 16, 50, jnp.float32, (16, 4)),       # one kv head, ranges past the last slot
])
def test_kernel_writing_the_cache_equals_writing_then_attending(b, n, heads, kv, d, length, dtype,
                                                                 tiling):
  """decode_attention_write: the caches it returns equal dynamic_update_slice's bit for bit
  (every other slot untouched), and its output the reference's on the written cache."""
  rng = np.random.default_rng()
  q, k, v, start, slot = _inputs(rng, b, n, heads, kv, d, length, dtype)
  k_new, v_new = (jnp.asarray(rng.standard_normal((b, n, kv, d)), dtype) for _ in range(2))
  want_k, want_v = da.write_cache(k, v, k_new, v_new, slot)
  want = decode_attention_reference(q, want_k, want_v, start, slot)
  got, got_k, got_v = jax.jit(lambda *a: da.decode_attention_write(
      *a, backend='triton', tiling=tiling, interpret=True))(q, k_new, v_new, k, v, start,
                                                            jnp.int32(slot))
  np.testing.assert_array_equal(np.asarray(got_k, np.float32), np.asarray(want_k, np.float32))
  np.testing.assert_array_equal(np.asarray(got_v, np.float32), np.asarray(want_v, np.float32))
  assert got.shape == want.shape and got.dtype == want.dtype
  tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=tol, rtol=tol)
  xla = da.decode_attention_write(q, k_new, v_new, k, v, start, slot, backend='xla')
  np.testing.assert_array_equal(np.asarray(xla[1], np.float32), np.asarray(want_k, np.float32))
  np.testing.assert_allclose(np.asarray(xla[0], np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize('start,slot,n,length,tiling', [
    ((7, 0), 7, 1, 40, (16, 3)),     # a row whose only key is its own token (start == slot)
    ((16, 3), 16, 2, 50, (16, 4)),   # start on a range boundary; the last range sees nothing
    ((0, 5), 45, 5, 50, (16, 2)),    # the cache full to its last slot, a partial tail block
    ((2, 2), 2, 3, 64, (16, 4)),     # early in a generation: three of four ranges see nothing
    ((0, 0), 0, 2, 32, (16, 2)),     # the first tokens: nothing in the cache yet
])
def test_kernel_writing_the_cache_edge_cases(start, slot, n, length, tiling):
  rng = np.random.default_rng()
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  q, k, v, k_new, v_new = f(2, n, 4, 32), f(2, length, 2, 32), f(2, length, 2, 32), \
      f(2, n, 2, 32), f(2, n, 2, 32)
  start = jnp.asarray(start, jnp.int32)
  got, got_k, got_v = da.decode_attention_write(q, k_new, v_new, k, v, start, slot,
                                                backend='triton', tiling=tiling, interpret=True)
  want_k, want_v = da.write_cache(k, v, k_new, v_new, slot)
  want = decode_attention_reference(q, want_k, want_v, start, slot)
  np.testing.assert_array_equal(got_k, want_k)
  np.testing.assert_array_equal(got_v, want_v)
  assert np.all(np.isfinite(np.asarray(got)))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('b,n,heads,kv,d,length,dtype,tiling', [
    (1, 1, 16, 16, 128, 1098, jnp.bfloat16, None),    # gpt_1b's step, the default tiling
    (3, 5, 8, 2, 64, 128, jnp.bfloat16, (32, 2)),     # GQA x 5 new tokens: a table row each
    (2, 3, 4, 1, 32, 50, jnp.float32, (16, 4)),       # the smallest head dim rotated inside
    (2, 2, 4, 2, 16, 40, jnp.float32, (16, 2)),       # D 16: rotated outside, same contract
    (2, 2, 16, 2, 64, 96, jnp.bfloat16, (32, 2)),     # 2 tokens x group 8: no padded rows
    (16, 1, 16, 16, 128, 200, jnp.bfloat16, None),    # batch 16: one range by default
])
def test_kernel_rotating_q_and_the_new_keys_equals_rotating_first(b, n, heads, kv, d, length,
                                                                   dtype, tiling):
  """decode_attention_write(rotary=(cos, sin)) with q and the new keys unrotated: the caches
  and the output of rotating them with effjax.models.rope first, then writing and attending;
  the rows' positions differ (left padding), as in a batched generation."""
  from effjax.models import rope
  rng = np.random.default_rng()
  q, k, v, start, slot = _inputs(rng, b, n, heads, kv, d, length, dtype)
  k_new, v_new = (jnp.asarray(rng.standard_normal((b, n, kv, d)), dtype) for _ in range(2))
  positions = (slot + jnp.arange(n))[None] - start[:, None]
  tables = rope.rope_tables(positions, d, 10000.0)
  want_k, want_v = da.write_cache(k, v, rope.rotate(k_new, *tables), v_new, slot)
  want = decode_attention_reference(rope.rotate(q, *tables), want_k, want_v, start, slot)
  got, got_k, got_v = jax.jit(lambda *a: da.decode_attention_write(
      *a[:7], rotary=a[7:], backend='triton', tiling=tiling, interpret=True))(
          q, k_new, v_new, k, v, start, jnp.int32(slot), *tables)
  tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
  # float32 products in a different order may move a rotated key by one bf16 rounding step
  np.testing.assert_allclose(np.asarray(got_k, np.float32), np.asarray(want_k, np.float32),
                             atol=tol, rtol=tol)
  np.testing.assert_array_equal(np.asarray(got_v, np.float32), np.asarray(want_v, np.float32))
  untouched = np.ones(length, bool)
  untouched[slot:slot + n] = False
  np.testing.assert_array_equal(np.asarray(got_k, np.float32)[:, untouched],
                                np.asarray(k, np.float32)[:, untouched])
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=tol, rtol=tol)
  xla = da.decode_attention_write(q, k_new, v_new, k, v, start, slot, rotary=tables,
                                  backend='xla')
  np.testing.assert_array_equal(np.asarray(xla[1], np.float32), np.asarray(want_k, np.float32))
  np.testing.assert_allclose(np.asarray(xla[0], np.float32), np.asarray(want, np.float32))


def test_kernel_rotary_tables_of_the_wrong_shape_are_one_clear_error():
  q, k = jnp.ones((2, 1, 4, 32)), jnp.ones((2, 40, 2, 32))
  new = jnp.ones((2, 1, 2, 32))
  with pytest.raises(ValueError, match=r'rotary cos / sin must be \[B, n, D/2\] = \(2, 1, 16\)'):
    da.decode_attention_write(q, new, new, k, k, jnp.zeros(2, jnp.int32), 3,
                              rotary=(jnp.ones((2, 1, 32)), jnp.ones((2, 1, 32))),
                              backend='triton', interpret=True)


def test_kernel_writing_the_cache_rejects_new_keys_of_the_wrong_shape():
  q, k = jnp.ones((2, 1, 4, 32)), jnp.ones((2, 40, 2, 32))
  with pytest.raises(ValueError, match=r'new keys and values must be \[B, n, Hkv, D\] = '
                                       r'\(2, 1, 2, 32\); got \(2, 2, 2, 32\)'):
    da.decode_attention_write(q, jnp.ones((2, 2, 2, 32)), jnp.ones((2, 2, 2, 32)), k, k,
                              jnp.zeros(2, jnp.int32), 3, backend='triton', interpret=True)


def test_tiling_specs_resolve_per_cache_length():
  assert da.parse_tiling('') is None
  assert da.resolve_tiling('', 1, 16, 1098) == (64, 9, 4, 2)  # the default, 4 warps, 2 stages
  assert da.resolve_tiling(None, 1, 16, 1098) == (64, 9, 4, 2)
  assert da.resolve_tiling('128:auto', 1, 16, 1098) == (128, 4, 4, 2)  # auto split for 128
  assert da.resolve_tiling('auto:3:8:4', 1, 16, 1098) == (64, 3, 8, 4)
  assert da.resolve_tiling('64:100', 1, 16, 1098) == (64, 18, 4, 2)  # capped at 18 blocks
  assert da.resolve_tiling('64:100', 1, 16, 8256) == (64, 100, 4, 2)
  assert da.resolve_tiling((32, 5), 1, 16, 1098) == (32, 5, 4, 2)  # tuples as given
  assert da.resolve_tiling((32, 5, 8), 1, 16, 1098) == (32, 5, 8, 2)


@pytest.mark.parametrize('spec,message', [
    ('64', 'expected BLOCK_K:SPLIT[:WARPS[:STAGES]]'),
    ('48:4', 'BLOCK_K must be a power of two >= 16, got 48'),
    ('64:0', "SPLIT must be a positive integer or 'auto', got '0'"),
    ('64:4:3', 'WARPS must be 1, 2, 4, 8 or 16, got 3'),
    ('64:4:4:auto', "STAGES must be a positive integer, got 'auto'"),
    ('64:4:4:9', 'STAGES must be 1-8, got 9'),
    ('64:\u00b2', "SPLIT must be a positive integer or 'auto', got '\u00b2'"),
])
def test_bad_tiling_specs_are_one_clear_error(spec, message):
  with pytest.raises(ValueError, match=re.escape(f'decode attention tiling {spec!r}: {message}')):
    da.parse_tiling(spec)


def test_default_tiling_splits_a_batch_one_cache_over_the_gpu():
  assert da.default_tiling(1, 16, 1098) == (64, 9)  # 144 programs, two blocks or more each
  assert da.default_tiling(16, 16, 8256) == (64, 1)  # 256 programs already
  assert da.default_tiling(1, 2, 20)[0] == 32  # a short cache: one smaller block covers it
  block_k, split = da.default_tiling(1, 8, 8256)
  assert 8 * split <= da.TARGET_PROGRAMS and split >= 2


@pytest.mark.parametrize('call,message', [
    (lambda q, k: decode_attention(q, k, k[:, :5], jnp.zeros(2, jnp.int32), 3), 'of one shape'),
    (lambda q, k: decode_attention(q[:, :, :3], k, k, jnp.zeros(2, jnp.int32), 3),
     'multiple of the key/value heads'),
    (lambda q, k: decode_attention(q, k, k, jnp.zeros(2, jnp.int32), 3, backend='tpu'),
     "one of ('auto', 'triton', 'xla')"),
    (lambda q, k: decode_attention(q[..., :24], k[..., :24], k[..., :24], jnp.zeros(2, jnp.int32),
                                   3, backend='triton', interpret=True), 'head dim 24'),
    (lambda q, k: decode_attention(q, k, k, jnp.zeros(2, jnp.int32), 3, backend='triton',
                                   tiling=(16, 9), interpret=True), 'split=9'),
])
def test_bad_inputs_are_one_clear_error(call, message):
  q, k = jnp.ones((2, 1, 4, 32)), jnp.ones((2, 40, 2, 32))
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
    call(q, k)


def test_auto_is_xla_off_the_gpu_and_unsupported_shapes_fall_back(monkeypatch):
  assert da.resolve_backend('auto') == 'xla'  # this machine has no GPU
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert da.resolve_backend('auto') == 'triton'
  assert da.kernel_unsupported(1, 8, 8, 96, jnp.bfloat16) == 'head dim 96 is not a power of two >= 16'
  assert 'exceed' in da.kernel_unsupported(9, 32, 2, 64, jnp.bfloat16)
  assert da.kernel_unsupported(5, 8, 2, 128, jnp.bfloat16) is None


def test_engine_decodes_through_the_kernel_like_xla():
  """Plain and speculative greedy decoding of a GQA model, batched prompts of different
  lengths: token for token the same with the kernel (interpret mode) as with XLA."""
  from tests.infer.test_speculative import _split
  # head dim 32: the smallest the writing kernel rotates q and the new keys in itself
  target = _split(0, pattern='attention:mlp, flash:mlp', d_model=128, num_heads=4,
                  num_kv_heads=2)
  draft = _split(1, pattern='attention:mlp', num_layers=2, exit_layers='')
  rng = np.random.default_rng()
  prompts = [[int(t) for t in rng.integers(3, 259, n)] for n in (4, 11)]

  def run(method, kernel, write=False, tiling=''):
    options = gen.Options(method=method, max_new_tokens=8, sampler=Sampler(vocab_limit=259),
                          gamma=3, attention_kernel=kernel, attention_interpret=True,
                          cache_write_in_kernel=write, attention_tiling=tiling)
    return gen.Decoder(*target, options, draft=draft).generate(prompts).tokens

  xla = run('plain', 'xla')
  assert run('plain', 'triton') == xla
  assert run('speculative', 'triton') == xla
  # The kernel rotating q and the new keys and writing the cache itself
  # (infer.cache_write_in_kernel, the default): the same tokens, plain and with the speculative
  # verification passes (4 new tokens a row, left-padded rows).
  calls = []
  real = da.decode_attention_write
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(da, 'decode_attention_write', lambda *a, **k: calls.append(k.get('rotary')) or
               real(*a, **k))
    assert run('plain', 'triton', write=True) == xla
    assert run('speculative', 'triton', write=True) == xla
  assert calls and all(r is not None for r in calls)  # traced through the rotating kernel
  # infer.decode_attention_tiling reaches the kernel: a spec of its own, the same tokens
  tilings = []
  real_resolve = da.resolve_tiling
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(da, 'resolve_tiling', lambda t, *a: tilings.append(t) or real_resolve(t, *a))
    assert run('plain', 'triton', write=True, tiling='16:3:2:3') == xla
  assert tilings and set(tilings) == {'16:3:2:3'}


def test_kernel_lowers_to_a_valid_triton_module(monkeypatch, capfd):
  from effjax.kernels.decode_attention import gpu
  from tests.kernels.triton_lowering import assert_verified, triton_dump
  s = jax.ShapeDtypeStruct
  fn = lambda q, k, v, start, slot: decode_attention(q, k, v, start, slot, backend='triton')
  for length in (1098, 1024):  # with and without the masked tail block
    kv = s((2, length, 4, 128), jnp.bfloat16)
    dump = triton_dump(monkeypatch, capfd, gpu, fn, s((2, 5, 16, 128), jnp.bfloat16), kv, kv,
                       s((2,), jnp.int32), s((), jnp.int32))
    assert_verified(dump, 1)
  # one range (batch 16's default): the kernel normalises and stores the attention itself,
  # masked to the real rows; with a tiling spec's warps and stages
  one = lambda q, k, v, start, slot: decode_attention(q, k, v, start, slot, backend='triton',
                                                      tiling='64:1:8:3')
  kv = s((16, 1098, 4, 128), jnp.bfloat16)
  dump = triton_dump(monkeypatch, capfd, gpu, one, s((16, 1, 16, 128), jnp.bfloat16), kv, kv,
                     s((16,), jnp.int32), s((), jnp.int32))
  assert_verified(dump, 1)


def test_kernel_writing_the_cache_lowers_to_a_valid_triton_module(monkeypatch, capfd):
  from effjax.kernels.decode_attention import gpu
  from tests.kernels.triton_lowering import assert_verified, triton_dump
  s = jax.ShapeDtypeStruct
  fn = lambda q, kn, vn, k, v, start, slot: da.decode_attention_write(
      q, kn, vn, k, v, start, slot, backend='triton')
  for n, length in ((1, 1098), (5, 1024)):  # a step with a tail block; a verify pass
    kv, new = s((2, length, 4, 128), jnp.bfloat16), s((2, n, 4, 128), jnp.bfloat16)
    dump = triton_dump(monkeypatch, capfd, gpu, fn, s((2, n, 16, 128), jnp.bfloat16), new, new,
                       kv, kv, s((2,), jnp.int32), s((), jnp.int32))
    assert_verified(dump, 1)
  # q and the new keys rotated in the kernel (as the engine calls it)
  rotated = lambda q, kn, vn, k, v, start, slot, cos, sin: da.decode_attention_write(
      q, kn, vn, k, v, start, slot, rotary=(cos, sin), backend='triton')
  for n, length in ((1, 1098), (5, 1024)):
    kv, new = s((2, length, 4, 128), jnp.bfloat16), s((2, n, 4, 128), jnp.bfloat16)
    table = s((2, n, 64), jnp.float32)
    dump = triton_dump(monkeypatch, capfd, gpu, rotated, s((2, n, 16, 128), jnp.bfloat16), new,
                       new, kv, kv, s((2,), jnp.int32), s((), jnp.int32), table, table)
    assert_verified(dump, 1)
  # batch 16, one range by default: normalised and stored by the kernel, no merge
  kv, new = s((16, 1098, 16, 128), jnp.bfloat16), s((16, 1, 16, 128), jnp.bfloat16)
  table = s((16, 1, 64), jnp.float32)
  dump = triton_dump(monkeypatch, capfd, gpu, rotated, s((16, 1, 16, 128), jnp.bfloat16), new,
                     new, kv, kv, s((16,), jnp.int32), s((), jnp.int32), table, table)
  assert_verified(dump, 1)


def test_model_decode_step_through_the_kernel_equals_the_masked_path(monkeypatch):
  """LM.decode (the path of bench decode and --mode=compress's reports): the full-cache kinds
  take the kernel when 'auto' resolves to it (a GPU, here pretended, the kernel interpreted);
  the logits equal those of model.attention_backend='reference' (the masked softmax)."""
  from flax import nnx

  from effjax.models import attention
  from effjax.models import lm as lm_lib
  from tests.helpers import tiny_config

  prompt = jnp.asarray(np.random.default_rng().integers(3, 259, (2, 9)), jnp.int32)

  def logits_and_cache(backend, write_in_kernel=False):
    config = tiny_config(pattern='attention:mlp, flash:mlp', d_model=256, num_heads=4,
                         num_kv_heads=2, attention_backend=backend, attention_interpret=True,
                         init_std=0.1)
    model = lm_lib.LM(config.model, rngs=nnx.Rngs(0))
    attention.set_cache_write_in_kernel(model, write_in_kernel)
    _, cache = model.prefill(prompt, model.init_cache(2, 16))
    return model.decode(prompt[:, -1], 9, cache)

  logits = lambda backend: logits_and_cache(backend)[0]

  want = logits('reference')
  calls = []
  real = da.decode_attention
  monkeypatch.setattr(da, 'decode_attention', lambda *a, **k: calls.append(1) or real(*a, **k))
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  got = logits('triton')
  assert len(calls) == 2  # both layers
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # The kernel writing the cache itself (set_cache_write_in_kernel, as time_decode sets it for
  # infer.cache_write_in_kernel): the same logits and the same caches.
  written = []
  real_write = da.decode_attention_write
  monkeypatch.setattr(da, 'decode_attention_write',
                      lambda *a, **k: written.append(1) or real_write(*a, **k))
  got_w, want_w = (logits_and_cache('triton', on) for on in (True, False))
  assert len(written) == 2
  np.testing.assert_allclose(got_w[0], want, atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_w[1]), jax.tree.leaves(want_w[1])):
    # (deeper layers' keys carry the first layer's summation-order differences)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
