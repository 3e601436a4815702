"""The output-major float GEMV kernel (effjax/kernels/gemv): in interpret mode against its
reference and the float64 product on random shapes and dtypes, its tiling rules and errors, its Triton module
lowered for CUDA on this CPU machine, and OutputMajorWeight's one-row products through it (the
same values as XLA's einsum; more rows keep the einsum); decoding with it gives the same tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.compress import weights as w_lib
from effjax.kernels import gemv


@pytest.mark.parametrize('k,n,dtype,tiling', [
    (2048, 2048, jnp.bfloat16, None),   # gpt_1b's out projection, the default tiling
    (256, 96, jnp.float32, None),       # a default halved to divide N
    (512, 64, jnp.bfloat16, (4, 128)),
    (4096, 32, jnp.float32, (2, 64)),   # 64 steps: the rolled K loop
])
def test_kernel_matches_the_float32_product(k, n, dtype, tiling):
  rng = np.random.default_rng()
  x = jnp.asarray(rng.standard_normal((1, k)), dtype)
  w = jnp.asarray(rng.standard_normal((n, k)), dtype)
  bn, bk = tiling or (None, None)
  got = jax.jit(lambda x, w: gemv.gemv_nk(x, w, bn=bn, bk=bk, backend='interpret'))(x, w)
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
  assert got.shape == (1, n) and got.dtype == dtype
  tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol * np.sqrt(k))
  ref = gemv.gemv_nk_reference(x, w)
  assert ref.shape == got.shape and ref.dtype == got.dtype
  np.testing.assert_allclose(np.asarray(ref, np.float64), want, rtol=tol, atol=tol * np.sqrt(k))


@pytest.mark.parametrize('k,n,bn,bk,message', [
    (512, 64, 3, 128, 'bn=3 must be a power of two'),
    (512, 64, 8, 1, 'bk=1 must be a power of two >= 2'),
    (512, 64, 64, 256, 'an accumulator of 64 x 256 exceeds'),
    (512, 60, 8, 128, 'bn=8 must divide N=60'),
    (384, 64, 8, 256, 'bk=256 must divide K=384'),
])
def test_tiling_rules_are_one_clear_error(k, n, bn, bk, message):
  with pytest.raises(ValueError, match=message):
    gemv.gemv_nk(jnp.ones((1, k)), jnp.ones((n, k)), bn=bn, bk=bk, backend='interpret')


def test_bad_operands_are_one_clear_error():
  with pytest.raises(ValueError, match=r'one row \[1, K\] and w \[N, K\]'):
    gemv.gemv_nk(jnp.ones((2, 64)), jnp.ones((8, 64)), backend='interpret')
  with pytest.raises(ValueError, match='backend .cuda.: allowed triton, interpret'):
    gemv.gemv_nk(jnp.ones((1, 64)), jnp.ones((8, 64)), backend='cuda')
  assert gemv.default_tiling(96, 24) == (8, 32)
  assert gemv.default_tiling(7, 24) is None  # no power of two >= 2 divides K
  with pytest.raises(ValueError, match='output-major GEMV kernel .gpu.: allowed'):
    w_lib.output_major(None, ('wo',), kernel='gpu')


def test_kernel_lowers_to_a_valid_triton_module(monkeypatch, capfd):
  from effjax.kernels.gemv import gpu
  from tests.kernels.triton_lowering import assert_verified, triton_dump
  s = jax.ShapeDtypeStruct
  fn = lambda x, w: gemv.gemv_nk(x, w)
  for k, n in ((2048, 2048), (8192, 256)):  # unrolled and rolled K loops
    dump = triton_dump(monkeypatch, capfd, gpu, fn, s((1, k), jnp.bfloat16),
                       s((n, k), jnp.bfloat16))
    assert_verified(dump, 1)


def test_output_major_weight_one_row_products_through_the_kernel(monkeypatch):
  """wo [heads, head_dim, embed] stored output-major: a one-row product takes the kernel and
  equals the einsum; two rows keep the einsum."""
  from flax import nnx

  rng = np.random.default_rng()
  value = jnp.asarray(rng.standard_normal((64, 4, 32)), jnp.float32)  # [embed, heads, head_dim]
  layout = w_lib.layout_of(('heads', 'head_dim', 'embed'))
  param = nnx.Param(value)
  plain = w_lib.OutputMajorWeight(param, layout)
  fast = w_lib.OutputMajorWeight(param, layout, kernel='interpret')
  calls = []
  real = gemv.gemv_nk
  monkeypatch.setattr(gemv, 'gemv_nk', lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
  one = jnp.asarray(rng.standard_normal((1, 1, 4, 32)), jnp.float32)
  got = fast.einsum('btnh,nhd->btd', one, jnp.float32)
  np.testing.assert_allclose(got, plain.einsum('btnh,nhd->btd', one, jnp.float32), rtol=1e-5,
                             atol=1e-5)
  assert calls == [(64, 128)] and got.shape == (1, 1, 64)
  two = jnp.asarray(rng.standard_normal((2, 1, 4, 32)), jnp.float32)
  np.testing.assert_allclose(fast.einsum('btnh,nhd->btd', two, jnp.float32),
                             plain.einsum('btnh,nhd->btd', two, jnp.float32), rtol=1e-6)
  assert len(calls) == 1
  # Under a mesh that partitions arrays automatically the einsum stays (one custom call cannot
  # be split by XLA).
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ('tensor',))
  with jax.set_mesh(mesh):
    np.testing.assert_allclose(fast.einsum('btnh,nhd->btd', one, jnp.float32), got, rtol=1e-5,
                               atol=1e-5)
  assert len(calls) == 1


def test_engine_decodes_through_the_kernel_like_xla(monkeypatch):
  from effjax.infer import generate as gen
  from effjax.infer.sampling import Sampler
  from tests.infer.test_speculative import _split
  target = _split(0, pattern='attention:mlp, flash:mlp', num_heads=4, num_kv_heads=2)
  prompts = [[int(t) for t in np.random.default_rng().integers(3, 259, n)] for n in (4, 11)]

  def run(kernel, prompts):
    options = gen.Options(max_new_tokens=8, sampler=Sampler(vocab_limit=259),
                          output_major=('wo', 'w_down'), output_major_kernel=kernel)
    return gen.Decoder(*target, options).generate(prompts).tokens

  calls = []
  real = gemv.gemv_nk
  monkeypatch.setattr(gemv, 'gemv_nk', lambda *a, **k: calls.append(1) or real(*a, **k))
  assert run('', prompts[:1]) == run('interpret', prompts[:1])  # one row: the kernel
  assert calls  # traced through it (wo and w_down of both layers)
  calls.clear()
  assert run('interpret', prompts) == run('', prompts)  # two rows: XLA either way
  assert not calls
