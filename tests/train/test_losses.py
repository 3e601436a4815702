"""The chunked cross-entropy against the plain head + optax loss: values and both gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effjax.models.lm import head_logits
from effjax.train.losses import chunked_cross_entropy


def _reference(x, w, targets, weights, z_loss):
  logits = jnp.einsum('btd,dv->btv', x.astype(jnp.float32), w.astype(jnp.float32))
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights
  z = z_loss * jnp.square(jax.nn.logsumexp(logits, axis=-1)) * weights
  return jnp.sum(ce) + jnp.sum(z), jnp.sum(ce)


def _inputs(seed, b=3, t=24, d=16, v=40, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((b, t, d)), dtype)
  w = jnp.asarray(rng.standard_normal((d, v)) / 4, dtype)
  targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
  weights = jnp.asarray(rng.random((b, t)) < 0.8, jnp.float32)  # some padding
  return x, w, targets, weights


@pytest.mark.parametrize('chunk', [1, 6, 8, 24])
@pytest.mark.parametrize('z_loss', [0.0, 1e-3])
def test_matches_unchunked_loss_and_gradients(chunk, z_loss):
  seed = int(np.random.SeedSequence().entropy % 2**31)
  x, w, targets, weights = _inputs(seed)

  def chunked(x, w):
    total, _ = chunked_cross_entropy(x, w, targets, weights, z_loss, chunk)
    return total

  def reference(x, w):
    return _reference(x, w, targets, weights, z_loss)[0]

  got, got_grads = jax.value_and_grad(chunked, argnums=(0, 1))(x, w)
  want, want_grads = jax.value_and_grad(reference, argnums=(0, 1))(x, w)
  np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f'seed={seed}')
  for g, r in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5, err_msg=f'seed={seed}')
  _, ce_sum = chunked_cross_entropy(x, w, targets, weights, z_loss, chunk)
  np.testing.assert_allclose(ce_sum, _reference(x, w, targets, weights, z_loss)[1], rtol=1e-5)


def test_gradient_scales_with_the_cotangent_and_works_under_jit():
  x, w, targets, weights = _inputs(int(np.random.SeedSequence().entropy % 2**31))
  f = jax.jit(jax.grad(lambda x, w: 2.5 * chunked_cross_entropy(x, w, targets, weights, 0.0, 8)[0],
                       argnums=(0, 1)))
  g = jax.grad(lambda x, w: 2.5 * _reference(x, w, targets, weights, 0.0)[0], argnums=(0, 1))
  for a, b in zip(f(x, w), g(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bfloat16_inputs_stay_close_to_float32():
  x, w, targets, weights = _inputs(int(np.random.SeedSequence().entropy % 2**31))
  want = _reference(x, w, targets, weights, 0.0)[0]
  got = chunked_cross_entropy(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), targets, weights,
                              0.0, 8)[0]
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-2)
  gx, gw = jax.grad(lambda a, b: chunked_cross_entropy(a, b, targets, weights, 0.0, 8)[0],
                    argnums=(0, 1))(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
  got16 = chunked_cross_entropy(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), targets, weights,
                                0.0, 8, jnp.bfloat16)[0]  # bf16-stored logits: close, not exact
  np.testing.assert_allclose(got16, want, rtol=2e-2)


def test_chunk_must_divide_sequence():
  x, w, targets, weights = _inputs(0)
  with pytest.raises(ValueError, match=r'train.loss_chunk_size=5 must .* divide the sequence'):
    chunked_cross_entropy(x, w, targets, weights, 0.0, 5)


def test_head_logits_backward_runs_in_the_input_dtype():
  """Float32 logits from bf16 operands; gradients equal autodiff of the bf16-cast cotangent."""
  x, w, _, _ = _inputs(int(np.random.SeedSequence().entropy % 2**31))
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  probe = jnp.asarray(np.random.default_rng(1).standard_normal((3, 24, 40)), jnp.float32)
  out = head_logits(xb, wb, jnp.float32)
  assert out.dtype == jnp.float32
  gx, gw = jax.grad(lambda a, b: jnp.sum(head_logits(a, b, jnp.float32) * probe),
                    argnums=(0, 1))(xb, wb)
  pb = probe.astype(jnp.bfloat16)
  np.testing.assert_allclose(np.asarray(gx, np.float32),
                             np.asarray(jnp.einsum('btv,dv->btd', pb, wb), np.float32), rtol=1e-2)
  np.testing.assert_allclose(np.asarray(gw, np.float32), np.asarray(
      jnp.einsum('btd,btv->dv', xb, pb, preferred_element_type=jnp.float32).astype(jnp.bfloat16),
      np.float32), rtol=1e-2, atol=1e-2)
  # float32 operands: exactly plain autodiff
  g32 = jax.grad(lambda a: jnp.sum(head_logits(a, w, jnp.float32) * probe))(x)
  np.testing.assert_allclose(g32, jax.grad(lambda a: jnp.sum((a @ w) * probe))(x), rtol=1e-6)
