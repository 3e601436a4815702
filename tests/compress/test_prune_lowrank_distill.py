"""Pruning masks survive the optimizer, 2:4 holds, SVD at full rank is exact, distillation's loss
is its formula."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effjax.compress import distill, lowrank, prune
from effjax.compress import weights as w_lib
from effjax.parallel import sharding as shd
from effjax.train import step as step_lib
from tests.helpers import build, random_batch, tiny_config

TARGETS = ('wq', 'wk', 'wv', 'wo', 'w_gate', 'w_up', 'w_down')


def _leaves(params):
  return {w_lib.path_key(tuple(getattr(k, 'key', k) for k in path[:-1])): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_pruned_entries_stay_exactly_zero_through_adamw_with_weight_decay():
  config = tiny_config()
  config.compress.method = 'magnitude'
  config.optim.weight_decay = 0.5
  config.optim.warmup_steps = 0
  mesh, rules, setup = build(config, jax.devices()[:1])
  with jax.set_mesh(mesh), shd.axis_rules(rules):
    state = setup.init(seed=1)
    model = nnx.merge(setup.graphdef, state['params'])
    sparsity = prune.prune_model(model, config.compress, 'magnitude')
    assert all(abs(s - 0.5) < 0.01 for s in sparsity.values())
    params = nnx.state(model, nnx.Param)
    state = {'step': state['step'], 'params': params, 'opt_state': setup.optimizer.init(params)}
    state = jax.device_put(state, setup.state_shardings)
    before = {k: np.asarray(v) for k, v in _leaves(params).items() if k.split('.')[-1] in TARGETS}
    zeros_before = {k: v == 0 for k, v in before.items()}
    train_step = step_lib.make_train_step(setup)
    batch = random_batch(np.random.default_rng(0), 16, 32)
    for _ in range(4):
      state, metrics = train_step(state, step_lib.device_batch(setup, batch, 1))
    assert int(metrics['finite']) == 1
    after = _leaves(state['params'])
    for key, was_zero in zeros_before.items():
      value = np.asarray(after[key])
      assert np.all(value[was_zero] == 0), key  # never revived
      assert np.any(value[~was_zero] != before[key][~was_zero]), key  # the rest trained


def test_two_four_pattern_and_global_magnitude():
  layout = w_lib.layout_of(('layers', 'embed', 'mlp'))
  w = jax.random.normal(jax.random.key(0), (2, 16, 8))
  mask = prune.two_four_mask(w, layout)
  quads = np.asarray(mask).reshape(2, 4, 4, 8)
  assert np.all(quads.sum(axis=2) == 2)  # two of every four consecutive inputs
  mags = np.abs(np.asarray(w)).reshape(2, 4, 4, 8)
  kept_min = np.where(quads, mags, np.inf).min(axis=2)
  dropped_max = np.where(quads, -np.inf, mags).max(axis=2)
  assert np.all(kept_min >= dropped_max)
  a = (jnp.arange(64.0).reshape(8, 8), w_lib.layout_of(('embed', 'mlp')))
  b = (100 + jnp.arange(64.0).reshape(8, 8), w_lib.layout_of(('embed', 'mlp')))
  masks = prune.magnitude_masks({'a': a, 'b': b}, 0.5, 'global')
  assert not bool(masks['a'].any()) and bool(masks['b'].all())  # ranked together
  masks = prune.magnitude_masks({'a': a, 'b': b}, 0.5, 'layer')
  assert int(masks['a'].sum()) == int(masks['b'].sum()) == 32


def test_svd_full_rank_equals_original_and_energy_rank():
  layout = w_lib.layout_of(('layers', 'heads', 'head_dim', 'embed'))  # wo, two input axes
  w = jax.random.normal(jax.random.key(1), (2, 4, 8, 24))
  u, v = lowrank.factor(w, layout, rank=24)
  assert u.shape == (2, 4, 8, 24) and v.shape == (2, 24, 24)
  np.testing.assert_allclose(w_lib._product(u, v, layout), w, atol=1e-4)
  # Singular values 8, 4, 2, 1: energy 64/85 = 0.753 at rank 1, 80/85 = 0.941 at rank 2.
  q1, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(2), (16, 4)))
  q2, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(3), (12, 4)))
  m = (q1 * jnp.array([8.0, 4.0, 2.0, 1.0])) @ q2.T
  flat = w_lib.layout_of(('embed', 'mlp'))
  assert lowrank.rank_for_energy(m, flat, 0.7) == 1
  assert lowrank.rank_for_energy(m, flat, 0.9) == 2
  assert lowrank.rank_for_energy(m, flat, 0.98) == 3  # 84/85 = 0.988
  assert lowrank.rank_for_energy(m, flat, 0.99) == 4
  # Stacked layers share one rank, the largest any layer needs: a layer with singular values
  # 8, 8, 8, 1 needs 3 for 0.9 (192/193 = 0.995) where m needs 2.
  m3 = (q1 * jnp.array([8.0, 8.0, 8.0, 1.0])) @ q2.T
  stacked = w_lib.layout_of(('layers', 'embed', 'mlp'))
  assert lowrank.rank_for_energy(jnp.stack([m, m3]), stacked, 0.9) == 3
  assert lowrank.rank_for_energy(jnp.stack([m, m]), stacked, 0.9) == 2
  x = jax.random.normal(jax.random.key(4), (2, 3, 4, 8))
  param = lambda a, names: w_lib._param(a, names)
  u1, v1 = lowrank.factor(w[0], w_lib.layout_of(('heads', 'head_dim', 'embed')), 5)
  weight = w_lib.LowRankWeight(param(u1, ('heads', 'head_dim', None)), param(v1, (None, 'embed')),
                               w_lib.layout_of(('heads', 'head_dim', 'embed')))
  np.testing.assert_allclose(weight.einsum('btnh,nhd->btd', x, jnp.float32),
                             jnp.einsum('btnh,nhd->btd', x, weight[...]), rtol=1e-4, atol=1e-4)


def test_distillation_loss_is_its_formula():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 3, 7)), rng.normal(size=(2, 3, 7))
  weights = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
  temperature = 2.5

  def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  p_t, p_s = softmax(t / temperature), softmax(s / temperature)
  expected = temperature ** 2 * np.sum(np.sum(p_t * np.log(p_t / p_s), -1) * weights)
  got = distill.kl_sum(jnp.asarray(s), jnp.asarray(t), jnp.asarray(weights), temperature)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert float(distill.kl_sum(jnp.asarray(s), jnp.asarray(s), jnp.asarray(weights), 2.0)) < 1e-6
  h_s, h_t = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 4))
  np.testing.assert_allclose(distill.hidden_sum(jnp.asarray(h_s), jnp.asarray(h_t), weights),
                             np.sum(np.mean((h_s - h_t) ** 2, -1) * weights), rtol=1e-5)


def test_distillation_step_loss_adds_the_soft_target_term():
  import json
  config = tiny_config()
  teacher_model = config.model.to_dict()
  config.model.num_layers = 1
  config.compress.method = 'distill'
  config.compress.teacher_model = json.dumps(teacher_model)
  config.compress.distill_weight = 0.5
  config.compress.distill_temperature = 2.0
  mesh, rules, setup = build(config, jax.devices()[:1])
  batch = random_batch(np.random.default_rng(1), 16, 32)
  with jax.set_mesh(mesh), shd.axis_rules(rules):
    state = setup.init(seed=0)
    mb = jax.tree.map(lambda x: x[0], step_lib.device_batch(setup, batch, 1))
    forward = distill.forward_losses_fn(config.compress)
    ce, extra, count, _ = forward(setup.graphdef, state['params'], mb, 0.0)
    model = nnx.merge(setup.graphdef, state['params'])
    args = (mb['inputs'], mb['positions'], mb['segment_ids'])
    kl = distill.kl_sum(model(*args), model.teacher(*args), mb['weights'], 2.0)
    ce_plain, _, _, _ = step_lib._forward_losses(setup.graphdef, state['params'], mb, 0.0)
    np.testing.assert_allclose(ce, ce_plain, rtol=1e-5)
    np.testing.assert_allclose(extra, 0.5 * kl, rtol=1e-4)
    # The teacher is frozen: no optimizer moments for it, and training leaves it unchanged.
    assert not any('teacher' in jax.tree_util.keystr(p)
                   for p, _ in jax.tree_util.tree_flatten_with_path(
                       state['opt_state'])[0] if 'mu' in jax.tree_util.keystr(p))
    teacher_before = jax.device_get(nnx.state(model.teacher, nnx.Param))
    state, _ = step_lib.make_train_step(setup)(state, step_lib.device_batch(setup, batch, 1))
    teacher_after = jax.device_get(nnx.state(nnx.merge(setup.graphdef, state['params']).teacher,
                                             nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, teacher_after, teacher_before)
