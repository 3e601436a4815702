"""The MoE feed-forward against per-token loops: dropless output and gradients, the documented
capacity drops, expert choice, the router losses' formulas, metrics, training and FLOPs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effjax.models import layers, lm as lm_lib, moe as moe_lib
from effjax.models.registry import MIXERS
from effjax.parallel import sharding as shd
from effjax.train import flops as flops_lib
from effjax.train import step as step_lib
from tests.helpers import build, random_batch, tiny_config

D, F, E = 16, 24, 4


def _cfg(**moe):
  c = tiny_config(pattern='attention:moe', d_model=D, mlp_dim=F, init_std=0.5)
  c.model.moe_num_experts = E
  for k, v in moe.items():
    setattr(c.model, f'moe_{k}', v)
  return c.model


def _moe(rng, **moe):
  return moe_lib.MoE(_cfg(**moe), rngs=nnx.Rngs(int(rng.integers(1 << 30))))


def _run(module, x_btd, seg_bt=None):
  """The layer's output and statistics, as one compiled program (called eagerly, each of its
  primitives would be compiled on its own: most of a test's time on CPU)."""
  graphdef, state = nnx.split(module)

  @jax.jit
  def run(state, x_btd, seg_bt):
    ctx = layers.Context(positions=jnp.zeros(x_btd.shape[:2], jnp.int32), segment_ids=seg_bt)
    with moe_lib.collect_stats() as sink:
      y = nnx.merge(graphdef, state)(x_btd, ctx)
    return y, sink[0]
  return run(state, jnp.asarray(x_btd), None if seg_bt is None else jnp.asarray(seg_bt))


def _swiglu(x_d, wg, wu, wd):
  return (jax.nn.silu(x_d @ wg) * (x_d @ wu)) @ wd


def _shared(p, x_d):
  if 'shared_gate' not in p:
    return jnp.zeros_like(x_d)
  return _swiglu(x_d, p['shared_gate'], p['shared_up'], p['shared_down'])


def _params(module):
  return {k: v[...] for k, v in nnx.state(module, nnx.Param).items()}


def loop_reference(p, cfg, x_btd, seg_bt=None, keep_slot=None):
  """Token by token: softmax router, top-k (renormalised for k > 1), the chosen experts' sum.

  keep_slot(t, j) -> bool drops slots (capacity); padding tokens get only the shared experts.
  """
  b, t, d = x_btd.shape
  x = x_btd.reshape(-1, d)
  valid = np.ones(b * t, bool) if seg_bt is None else np.asarray(seg_bt).reshape(-1) > 0
  rows = []
  for i in range(b * t):
    y = _shared(p, x[i])
    if valid[i]:
      probs = jax.nn.softmax(x[i] @ p['router'])
      top_p, top_e = jax.lax.top_k(probs, cfg.moe_top_k)
      if cfg.moe_top_k > 1:
        top_p = top_p / top_p.sum()
      for j in range(cfg.moe_top_k):
        if keep_slot is None or keep_slot(i, j):
          e = top_e[j]
          y = y + top_p[j] * _swiglu(x[i], p['w_gate'][e], p['w_up'][e], p['w_down'][e])
    rows.append(y)
  return jnp.stack(rows).reshape(b, t, d)


def _padding(rng, b, t):
  seg = np.ones((b, t), np.int32)
  seg[0, t - 2:] = 0  # a padded tail
  seg[-1, : t // 2] = 1
  seg[-1, t // 2:] = 2
  return seg


@pytest.mark.parametrize('top_k,shared', [(1, 0), (2, 0), (2, 1)])
def test_dropless_output_and_gradients_equal_token_loop(top_k, shared):
  rng = np.random.default_rng()
  module = _moe(rng, top_k=top_k, num_shared_experts=shared)
  x = jnp.asarray(rng.standard_normal((2, 5, D)), jnp.float32)
  seg = _padding(rng, 2, 5)
  cot = jnp.asarray(rng.standard_normal((2, 5, D)), jnp.float32)
  graphdef, state = nnx.split(module)

  def ours(state, x):
    y, _ = _run(nnx.merge(graphdef, state), x, seg)
    return jnp.sum(y * cot), y

  def ref(p, x):
    y = loop_reference(p, module.cfg, x, seg)
    return jnp.sum(y * cot), y

  (_, y), (g_state, g_x) = jax.jit(jax.value_and_grad(ours, argnums=(0, 1), has_aux=True))(
      state, x)
  (_, y_ref), (g_p, g_x_ref) = jax.jit(jax.value_and_grad(ref, argnums=(0, 1), has_aux=True))(
      _params(module), x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_x, g_x_ref, rtol=1e-4, atol=1e-5)
  for name, g in g_p.items():
    np.testing.assert_allclose(g_state[name][...], g, rtol=1e-4, atol=1e-5, err_msg=name)
  assert float(jnp.abs(g_state['router'][...]).max()) > 0  # the router learns from the output


def _hand_routed(rng, module, choices_nk, b, t):
  """x whose router logits put choice j of token i on expert choices[i][j] (identity router)."""
  router = np.zeros((D, E), np.float32)
  router[np.arange(E), np.arange(E)] = 1.0
  module.router[...] = jnp.asarray(router)
  x = rng.standard_normal((b * t, D)).astype(np.float32)
  x[:, :E] = 0.1 * rng.standard_normal((b * t, E))
  for i, row in enumerate(choices_nk):
    for j, e in enumerate(row):
      x[i, e] += 8.0 / (j + 1)  # first choice 8, second 4: a clear order
  return jnp.asarray(x.reshape(b, t, D))


def test_capacity_drops_the_latest_slots_of_an_overfull_expert():
  rng = np.random.default_rng()
  module = _moe(rng, top_k=1, capacity_factor=1.0)  # C = ceil(8 tokens * 1 / 4) = 2
  first = [0, 0, 0, 1, 2, 0, 1, 1]  # flattened over a batch of 2 rows of 4
  x = _hand_routed(rng, module, [[e] for e in first], 2, 4)
  y, stats = _run(module, x)
  dropped = {2, 5, 7}  # expert 0 keeps tokens 0, 1 (of 0, 1, 2, 5); expert 1 keeps 3, 6 (of 3, 6, 7)
  ref = loop_reference(_params(module), module.cfg, x, keep_slot=lambda i, j: i not in dropped)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  y_flat = np.asarray(y).reshape(8, D)
  assert np.all(y_flat[sorted(dropped)] == 0) and np.all(np.abs(y_flat[[0, 1, 3, 4, 6]]).sum(1) > 0)
  np.testing.assert_allclose(stats['dropped_fraction'], 3 / 8, rtol=1e-6)
  np.testing.assert_allclose(stats['load'], [4 / 8, 3 / 8, 1 / 8, 0], rtol=1e-6)  # before drops


def test_capacity_priority_is_token_order_then_choice_rank():
  rng = np.random.default_rng()
  module = _moe(rng, top_k=2, capacity_factor=1.0)  # C = ceil(8 * 2 / 4) = 4
  first = [0, 0, 1, 0, 0, 2, 0, 3]
  second = [1, 2, 0, 3, 1, 0, 2, 0]
  x = _hand_routed(rng, module, list(zip(first, second)), 2, 4)
  y, stats = _run(module, x)
  # Expert 0's slots in priority order: (0,0) (1,0) (2,1) (3,0) | (4,0) (5,1) (6,0) (7,1): token 2's
  # second choice is kept, token 4's first choice is dropped.
  dropped = {(4, 0), (5, 1), (6, 0), (7, 1)}
  ref = loop_reference(_params(module), module.cfg, x,
                       keep_slot=lambda i, j: (i, j) not in dropped)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats['dropped_fraction'], 4 / 16, rtol=1e-6)


def test_expert_choice_picks_each_experts_top_tokens():
  rng = np.random.default_rng()
  module = _moe(rng, routing='expert_choice', capacity_factor=1.0, top_k=1)  # C = ceil(10/4) = 3
  x = jnp.asarray(rng.standard_normal((2, 5, D)), jnp.float32)
  seg = _padding(rng, 2, 5)
  y, stats = _run(module, x, seg)
  p = _params(module)
  x_flat = np.asarray(x).reshape(10, D)
  valid = seg.reshape(-1) > 0
  probs = np.asarray(jax.nn.softmax(x_flat @ np.asarray(p['router']), axis=-1))
  ref = np.zeros((10, D), np.float32)
  picked = np.zeros(10, bool)
  for e in range(E):
    score = np.where(valid, probs[:, e], -1.0)
    for i in np.argsort(-score)[:3]:
      if valid[i]:
        picked[i] = True
        ref[i] += probs[i, e] * np.asarray(
            _swiglu(x_flat[i], p['w_gate'][e], p['w_up'][e], p['w_down'][e]))
  np.testing.assert_allclose(np.asarray(y).reshape(10, D), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats['dropped_fraction'], (valid & ~picked).sum() / valid.sum(),
                             rtol=1e-6)


def test_router_losses_and_metrics_follow_their_formulas():
  rng = np.random.default_rng()
  module = _moe(rng, top_k=2, aux_loss_weight=0.3, z_loss_weight=0.05)
  b, t = 2, 6
  logits = rng.standard_normal((b * t, E)).astype(np.float32) * 3
  router = np.zeros((D, E), np.float32)
  router[np.arange(E), np.arange(E)] = 1.0
  module.router[...] = jnp.asarray(router)
  x = rng.standard_normal((b * t, D)).astype(np.float32)
  x[:, :E] = logits  # router logits = these, exactly
  seg = _padding(rng, b, t)
  _, stats = _run(module, jnp.asarray(x.reshape(b, t, D)), seg)

  valid = seg.reshape(-1) > 0
  lv = logits[valid].astype(np.float64)
  probs = np.exp(lv - lv.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  top2 = np.argsort(-probs, axis=1)[:, :2]
  f = np.bincount(top2.reshape(-1), minlength=E) / top2.size
  big_p = probs.mean(0)
  aux = E * np.sum(f * big_p)
  lse = np.log(np.exp(lv).sum(1))
  z = np.mean(lse ** 2)
  entropy = np.mean(-np.sum(probs * np.log(probs), axis=1))
  np.testing.assert_allclose(stats['aux_loss'], aux, rtol=1e-5)
  np.testing.assert_allclose(stats['z_loss'], z, rtol=1e-5)
  np.testing.assert_allclose(stats['loss'], 0.3 * aux + 0.05 * z, rtol=1e-5)
  np.testing.assert_allclose(stats['router_entropy'], entropy, rtol=1e-5)
  np.testing.assert_allclose(stats['load'], f, rtol=1e-6)
  assert float(stats['load'].sum()) == pytest.approx(1.0)
  assert float(stats['dropped_fraction']) == 0.0
  assert 0 < float(stats['router_entropy']) < math.log(E)


def _lm_config(**moe):
  c = tiny_config(pattern='attention:moe', moe_num_experts=4)
  c.model.moe_top_k = 2
  for k, v in moe.items():
    setattr(c.model, f'moe_{k}', v)
  return c


def test_scanned_and_looped_stacks_report_the_same_statistics():
  rng = np.random.default_rng()
  config = _lm_config(capacity_factor=1.0)
  scanned = lm_lib.LM(config.model, rngs=nnx.Rngs(1))
  config.model.scan_layers = False
  looped = lm_lib.LM(config.model, rngs=nnx.Rngs(0))
  stacked = nnx.state(scanned.groups)
  for i, group in enumerate(looped.groups):
    nnx.update(group, jax.tree.map(lambda x: x[i], stacked))
  looped.embedding[...] = scanned.embedding[...]
  tokens = jnp.asarray(rng.integers(3, 259, (2, 16)))
  forward = nnx.jit(lambda model, tokens: model.logits_and_stats(tokens))
  (a, sa), (b, sb) = forward(scanned, tokens), forward(looped, tokens)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert set(sa) == set(moe_lib.summary_keys(4))
  per_expert = [float(sa[f'load_e{i:02d}']) for i in range(4)]
  assert sum(per_expert) == pytest.approx(1.0)  # each layer's loads sum to 1, so does their mean
  assert min(per_expert) >= float(sa['load_min']) and max(per_expert) <= float(sa['load_max'])
  for k in sa:
    np.testing.assert_allclose(sa[k], sb[k], rtol=1e-5, err_msg=k)
  assert 0 < float(sa['dropped_fraction']) < 1  # capacity 1.0 with a random router drops some


def test_training_adds_router_losses_but_reports_plain_cross_entropy():
  batch = random_batch(np.random.default_rng(), 16, 32)
  results = {}
  for weight in (0.0, 1.0):
    config = _lm_config(aux_loss_weight=weight, z_loss_weight=weight)
    mesh, rules, setup = build(config, jax.devices()[:1])
    with jax.set_mesh(mesh), shd.axis_rules(rules):
      state = setup.init(seed=4)
      train_step, eval_step = step_lib.make_train_step(setup), step_lib.make_eval_step(setup)
      db = step_lib.device_batch(setup, batch, 1)
      losses = []
      for _ in range(4):
        ev = jax.device_get(eval_step(state['params'], db))
        state, metrics = train_step(state, db)
        metrics = jax.device_get(metrics)
        # The logged loss is the cross-entropy of the params before the update, like eval's.
        np.testing.assert_allclose(metrics['loss'], ev['loss_sum'] / ev['tokens'], rtol=1e-5)
        losses.append(float(metrics['loss']))
    results[weight] = metrics
    assert losses[-1] < losses[1]  # step 0 has learning rate 0
  for key in ('moe_aux_loss', 'moe_z_loss', 'moe_router_entropy', 'moe_load_max'):
    assert np.isfinite(results[1.0][key]) and results[1.0][key] > 0, key
  assert results[1.0]['moe_dropped_fraction'] == 0.0
  np.testing.assert_allclose(results[1.0]['moe_loss'],
                             2 * (results[1.0]['moe_aux_loss'] + results[1.0]['moe_z_loss']),
                             rtol=1e-5)  # two MoE layers, each weighted 1.0
  assert results[0.0]['moe_loss'] == 0.0
  assert abs(results[1.0]['grad_norm'] - results[0.0]['grad_norm']) > 1e-3


def test_flops_and_params_count_active_experts_only():
  config = _lm_config(expert_mlp_dim=32, num_shared_experts=1, top_k=2)
  m = config.model
  model = lm_lib.LM(m, rngs=nnx.Rngs(0))
  assert lm_lib.count_params(m) == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  d, f = m.d_model, 32
  active = d * 4 + 2 * 3 * d * f + 3 * d * f  # router, 2 of 4 experts, 1 shared
  assert moe_lib.MoE.flops_per_token(m, 32) == 2 * active
  attention = MIXERS.get('attention').flops_per_token(m, 32)
  expected = m.num_layers * (attention + 2 * active) + 2 * d * m.vocab_size
  assert flops_lib.forward_flops_per_token(m, 32) == expected
  assert 2 * active < 2 * moe_lib.MoE.num_params(m)  # not every expert's weights
  attention_params = MIXERS.get('attention').num_params(m)
  assert lm_lib.count_params(m, include_embedding=False, active=True) == (
      m.num_layers * (attention_params + active + 2 * d) + d)  # + the norms


def test_accumulated_micro_batches_average_the_statistics():
  """Two micro-batches: statistics are the token-weighted mean of each one's (run alone)."""
  batch = random_batch(np.random.default_rng(), 16, 32)
  halves = [{k: v[i * 8:(i + 1) * 8] for k, v in batch.items()} for i in range(2)]
  config = _lm_config()
  config.train.batch_size = 8
  mesh, rules, setup = build(config, jax.devices()[:1])
  with jax.set_mesh(mesh), shd.axis_rules(rules):
    state = setup.init(seed=5)
    alone = [jax.device_get(step_lib.make_train_step(setup)(
        jax.tree.map(jnp.copy, state), step_lib.device_batch(setup, h, 1))[1]) for h in halves]
    config.train.grad_accum_steps = 2
    accumulated = jax.device_get(step_lib.make_train_step(setup)(
        state, step_lib.device_batch(setup, batch, 2))[1])
  tokens = np.array([m['tokens'] for m in alone])
  for key in ('loss', 'moe_aux_loss', 'moe_z_loss', 'moe_loss', 'moe_router_entropy'):
    expected = np.sum(tokens * np.array([m[key] for m in alone])) / tokens.sum()
    np.testing.assert_allclose(accumulated[key], expected, rtol=1e-5, err_msg=key)
