"""The language model: packing isolation, causality, scan == loop, remat == none, param count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effjax.models import lm as lm_lib
from effjax.models.attention import segment_mask
from effjax.train import flops as flops_lib
from tests.helpers import tiny_config


def _model(seed=0, **overrides):
  config = tiny_config(**overrides)
  return config, lm_lib.LM(config.model, rngs=nnx.Rngs(seed))


def test_packed_documents_do_not_see_each_other():
  rng = np.random.default_rng()
  _, model = _model(seed=int(rng.integers(1 << 30)))
  doc_a = rng.integers(3, 259, 11)
  doc_b = rng.integers(3, 259, 14)
  packed = np.concatenate([doc_a, doc_b, np.zeros(7, int)])[None]
  segments = np.array([[1] * 11 + [2] * 14 + [0] * 7])
  positions = np.array([list(range(11)) + list(range(14)) + [0] * 7])
  out = model(jnp.asarray(packed), jnp.asarray(positions), jnp.asarray(segments))
  alone_a = model(jnp.asarray(doc_a[None]))
  alone_b = model(jnp.asarray(doc_b[None]))
  np.testing.assert_allclose(out[0, :11], alone_a[0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out[0, 11:25], alone_b[0], rtol=1e-4, atol=1e-4)


def test_causal_future_tokens_do_not_change_the_past():
  rng = np.random.default_rng()
  _, model = _model(seed=int(rng.integers(1 << 30)))
  tokens = rng.integers(3, 259, (2, 24))
  changed = tokens.copy()
  changed[:, 15:] = rng.integers(3, 259, (2, 9))
  a, b = model(jnp.asarray(tokens)), model(jnp.asarray(changed))
  np.testing.assert_allclose(a[:, :15], b[:, :15], rtol=1e-5, atol=1e-5)
  assert not np.allclose(a[:, 15:], b[:, 15:])


def test_segment_mask_excludes_padding_and_other_documents():
  seg = jnp.array([[1, 1, 2, 0]])
  m = np.asarray(segment_mask(seg))[0, 0]
  np.testing.assert_array_equal(m, [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])


def test_scanned_stack_equals_python_loop():
  rng = np.random.default_rng()
  config, scanned = _model(seed=3)
  config.model.scan_layers = False
  looped = lm_lib.LM(config.model, rngs=nnx.Rngs(0))
  # Copy the stacked parameters group by group into the unrolled model.
  stacked = nnx.state(scanned.groups)
  for i, group in enumerate(looped.groups):
    nnx.update(group, jax.tree.map(lambda x: x[i], stacked))
  looped.embedding[...] = scanned.embedding[...]
  nnx.update(looped.final_norm, nnx.state(scanned.final_norm))
  tokens = jnp.asarray(rng.integers(3, 259, (2, 16)))
  np.testing.assert_allclose(scanned(tokens), looped(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('policy', ['full', 'dots', 'block_outputs', 'attention_out'])
def test_remat_policies_leave_gradients_unchanged(policy):
  rng = np.random.default_rng()
  tokens = jnp.asarray(rng.integers(3, 259, (2, 16)))

  def grads(remat_policy):
    _, model = _model(seed=5, remat_policy=remat_policy)
    graphdef, params = nnx.split(model)
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)
    return jax.tree.leaves(jax.grad(loss)(params))

  for a, b in zip(grads('none'), grads(policy)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('tie', [True, False])
def test_param_count_formula_matches_model(tie):
  config, model = _model(tie_embeddings=tie)
  actual = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert lm_lib.count_params(config.model) == actual


def test_mixed_precision_policy():
  _, model = _model(param_dtype='float32', compute_dtype='bfloat16', output_dtype='float32')
  tokens = jnp.ones((1, 8), jnp.int32)
  assert model(tokens).dtype == jnp.float32
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  jaxpr = str(jax.make_jaxpr(lambda t: model(t))(tokens))
  assert 'bf16[1,8,4,16]' in jaxpr  # query heads are computed in bfloat16


def test_flops_formula_matches_xla_cost_analysis():
  """Our forward FLOPs (attention at full, as XLA computes it) agree with XLA's count.

  Unrolled layers: XLA's cost analysis counts a while-loop (scan) body once, not per iteration.
  """
  config, model = _model(scan_layers=False)
  m, seq = config.model, 64
  graphdef, params = nnx.split(model)
  tokens = jnp.ones((1, seq), jnp.int32)
  compiled = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)).lower(params, tokens).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  head_dim = m.d_model // m.num_heads
  full_attention_extra = m.num_layers * 0.5 * 4 * seq * m.num_heads * head_dim
  ours = (flops_lib.forward_flops_per_token(m, seq) + full_attention_extra) * seq
  assert cost['flops'] == pytest.approx(ours, rel=0.1)
