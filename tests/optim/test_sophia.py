"""Sophia: its estimators against exact curvature, its update against a NumPy transcription of the
paper's Algorithm 3, its relation to optax.contrib.sophia, compile-once jit, and sharding.

Each test draws a fresh seed (printed, so a failure can be replayed).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from effjax.optim import sophia as sophia_lib


@pytest.fixture
def seed():
  value = int(np.random.SeedSequence().entropy % (2**31))
  print(f'seed={value}')
  return value


def _flat(tree):
  return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def _assert_trees_close(got, want, rtol=1e-5):
  """Leafwise rtol, with entries near zero judged against the leaf's scale (rounding is)."""
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    b = np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(np.max(np.abs(b), initial=0)))


def _quadratic(rng, off_diagonal):
  """Params {'a': [4], 'b': {'c': [3, 4]}} and 0.5 v^T A v with A = diag(d) + off-diagonal part."""
  params = {'a': jnp.asarray(rng.standard_normal(4), jnp.float32),
            'b': {'c': jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)}}
  n = 16
  d = rng.uniform(0.5, 2.0, n)
  s = rng.standard_normal((n, n))
  s = off_diagonal * (s + s.T) / 2
  np.fill_diagonal(s, 0.0)
  a = d * np.eye(n) + s
  a32 = jnp.asarray(a, jnp.float32)
  loss = lambda p: 0.5 * _flat(p) @ a32 @ _flat(p)
  return params, loss, a


def test_hutchinson_on_a_diagonal_quadratic(seed):
  """u * (d * u) = d u**2: one Rademacher probe is exact, Gaussian probes average to d."""
  params, loss, a = _quadratic(np.random.default_rng(seed), off_diagonal=0.0)
  d = np.diag(a)
  key = jax.random.key(seed)
  one = jax.jit(functools.partial(sophia_lib.hutchinson, loss, distribution='rademacher'))(
      params, key)
  assert jax.tree.structure(one) == jax.tree.structure(params)
  np.testing.assert_allclose(_flat(one), d, rtol=1e-6)

  n = 4096
  keys = jax.random.split(key, n)
  est = jax.jit(jax.vmap(lambda k: _flat(sophia_lib.hutchinson(loss, params, k, 'gaussian'))))(
      keys)
  # Per coordinate d u**2 has standard deviation sqrt(2) d: the mean is within 5 standard errors.
  assert np.all(np.abs(np.mean(est, 0) - d) < 5 * np.sqrt(2) * d / np.sqrt(n))


@pytest.mark.parametrize('distribution', ['rademacher', 'gaussian'])
def test_hutchinson_error_shrinks_like_one_over_sqrt_n(seed, distribution):
  """With off-diagonal curvature: unbiased, and the mean-square error over n probes is var/n.

  Per coordinate Var[u_i (Au)_i] = sum_{j!=i} A_ij**2 for Rademacher probes and that plus 2 A_ii**2
  for Gaussian ones. 64 independent replicates of n probes give the mean-square error at n = 16 and
  n = 256; times n it must match the average variance (so the error falls as 1/sqrt(n)).
  """
  params, loss, a = _quadratic(np.random.default_rng(seed), off_diagonal=0.3)
  d = np.diag(a)
  off = np.sum(a ** 2, 1) - d ** 2
  var = off if distribution == 'rademacher' else off + 2 * d ** 2
  replicates, n_max = 64, 256
  keys = jax.random.split(jax.random.key(seed), replicates * n_max)
  est = jax.jit(jax.vmap(lambda k: _flat(sophia_lib.hutchinson(loss, params, k, distribution))))(
      keys)
  est = np.asarray(est, np.float64).reshape(replicates, n_max, -1)
  mse = {}
  for n in (16, 256):
    mse[n] = np.mean((est[:, :n].mean(1) - d) ** 2)
    np.testing.assert_allclose(mse[n] * n / np.mean(var), 1.0, rtol=0.3)
  assert mse[256] < mse[16] / 8  # 16x expected
  np.testing.assert_allclose(est.mean((0, 1)), d, atol=5 * np.sqrt(var.max() / est[:, :, 0].size))


def test_gauss_newton_bartlett_mean_is_the_ggn_diagonal(seed):
  """Softmax regression, masked tokens over [sequences, tokens]: E[B g_hat**2] = diag(GGN) exactly.

  For logits z_n = x_n W + b and the masked mean loss L = sum_n w_n l_n / sum_n w_n, the
  Gauss-Newton matrix is sum_n w_n J_n^T (diag(p_n) - p_n p_n^T) J_n / sum_n w_n, whose diagonal is
  sum_n w_n x_nd**2 p_nv (1 - p_nv) / sum_n w_n for W[d, v], and the same without x**2 for b[v].
  B counts unmasked tokens; counting sequences instead would be 6x (the tokens per sequence) too
  small and fail the z-test.
  """
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((4, 6, 3))
  mask = (rng.random((4, 6)) < 0.75).astype(np.float32)
  mask[0, 0] = 1.0
  params = {'w': jnp.asarray(rng.standard_normal((3, 5)), jnp.float32),
            'b': jnp.asarray(rng.standard_normal(5) * 0.5, jnp.float32)}
  logits_fn = lambda p: jnp.asarray(x, jnp.float32) @ p['w'] + p['b']

  z = x @ np.asarray(params['w'], np.float64) + np.asarray(params['b'], np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  var = p * (1 - p) * mask[..., None]
  exact = {'w': np.einsum('std,stv->dv', x ** 2, var) / mask.sum(),
           'b': var.sum((0, 1)) / mask.sum()}

  k = 8192
  keys = jax.random.split(jax.random.key(seed), k)
  est = jax.jit(jax.vmap(lambda key: sophia_lib.gauss_newton_bartlett(
      logits_fn, params, key, jnp.asarray(mask))))(keys)
  for name in ('w', 'b'):
    samples = np.asarray(est[name], np.float64)
    assert est[name].dtype == jnp.float32
    z_score = (samples.mean(0) - exact[name]) / (samples.std(0) / np.sqrt(k))
    assert np.max(np.abs(z_score)) < 5, (name, z_score)
    np.testing.assert_allclose(samples.mean(0), exact[name], rtol=0.15)


class _Tiny(nnx.Module):
  def __init__(self, dtype, rngs):
    self.l1 = nnx.Linear(3, 8, param_dtype=dtype, rngs=rngs)
    self.l2 = nnx.Linear(8, 5, param_dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


def test_estimators_and_update_on_bf16_nnx_state(seed):
  """bf16 nnx.State params: estimates are float32 trees of the same structure and equal (to
  float32 rounding) those of the float32-upcast params (the estimators differentiate in float32);
  the update keeps the gradient's dtype while the moments stay float32."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((2, 7, 3)), jnp.float32)
  model = _Tiny(jnp.bfloat16, nnx.Rngs(seed))
  graphdef, state = nnx.split(model, nnx.Param)
  state32 = jax.tree.map(lambda v: v.astype(jnp.float32), state)
  logits_fn = lambda s: nnx.merge(graphdef, s)(x)
  loss_fn = lambda s: jnp.mean(logits_fn(s) ** 2)
  key = jax.random.key(seed)
  estimators = (functools.partial(sophia_lib.gauss_newton_bartlett, logits_fn, key=key),
                functools.partial(sophia_lib.hutchinson, loss_fn, key=key),
                functools.partial(sophia_lib.hutchinson, loss_fn, key=key, distribution='gaussian'))
  estimate_all = jax.jit(lambda s: [estimate(s) for estimate in estimators])
  for low, high in zip(estimate_all(state), estimate_all(state32)):
    assert jax.tree.structure(low) == jax.tree.structure(state)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(low))
    for a, b in zip(jax.tree.leaves(low), jax.tree.leaves(high)):
      # Two programs: float32 rounding apart (seen 3.5e-7 relative); differentiating in bf16
      # would be about 1e-2 off.
      np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7 * float(np.max(np.abs(b))))

  opt = sophia_lib.sophia(1e-2, weight_decay_mask=lambda s: jax.tree.map(lambda v: v.ndim > 1, s))

  @jax.jit
  def update(state, opt_state):
    return opt.update(jax.grad(loss_fn)(state), opt_state, state, hessian_fn=estimators[1])

  updates, opt_state = update(state, opt.init(state))
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
  assert all(m.dtype == jnp.float32 for m in jax.tree.leaves(opt_state[0].mu))
  assert all(h.dtype == jnp.float32 for h in jax.tree.leaves(opt_state[0].hessian))


def test_clear_errors():
  params = {'w': jnp.ones((2,))}
  opt = sophia_lib.sophia(1e-3)
  state = opt.init(params)
  with pytest.raises(ValueError, match='hessian_fn'):
    opt.update(params, state, params)
  with pytest.raises(ValueError, match='rademacher, gaussian'):
    sophia_lib.hutchinson(lambda p: jnp.sum(p['w'] ** 2), params, jax.random.key(0), 'uniform')
  with pytest.raises(ValueError, match='exactly one Sophia state'):
    sophia_lib.sophia_stats(optax.adam(1e-3).init(params))


# The reference: Algorithm 3 written out in NumPy (float64), with a deterministic "estimator" whose
# values go negative where |theta| is small, so the eps floor and both clip sides are exercised.
B1, B2, RHO, EPS, WD, INTERVAL, STEPS = 0.9, 0.6, 0.3, 1e-12, 0.05, 3, 25


def _fake_hessian(p):
  return jax.tree.map(lambda x: 2 * x * x - 0.3, p)


def _learning_rate(t):
  return 0.1 + (0.01 - 0.1) * min(t, 20) / 20


def test_update_matches_numpy_algorithm_3(seed):
  """25 steps, refresh every 3, masked decay and a decaying schedule: params, m, h, count and the
  logged statistics equal the reference after every step."""
  rng = np.random.default_rng(seed)
  params = {'w': jnp.asarray(rng.standard_normal((4, 6)), jnp.float32),
            'norm': {'scale': jnp.asarray(rng.standard_normal(6), jnp.float32)}}
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * 0.5, jnp.float32),
                        params) for _ in range(STEPS)]
  mask = {'w': True, 'norm': {'scale': False}}
  opt = optax.chain(  # nested like the factory's clip + rule, so stats are found in depth
      optax.identity(),
      sophia_lib.sophia(optax.linear_schedule(0.1, 0.01, 20), b1=B1, b2=B2, rho=RHO, eps=EPS,
                        weight_decay=WD, weight_decay_mask=lambda p: mask,
                        update_interval=INTERVAL))

  @jax.jit
  def step(params, state, g):
    updates, state = opt.update(g, state, params, hessian_fn=_fake_hessian)
    return optax.apply_updates(params, updates), state

  ref_p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  ref_m = jax.tree.map(np.zeros_like, ref_p)
  ref_h = jax.tree.map(np.zeros_like, ref_p)
  state = opt.init(params)
  win_rates, nonpositive = [], []
  for t in range(STEPS):
    g = jax.tree.map(lambda x: np.asarray(x, np.float64), grads[t])
    if t:  # each step from the state the last one left: m / (rho h) with h near 0 amplifies
      # float32 rounding, which compounded over 25 steps to 2x the tolerance in 1 seed of 1000
      ref_p, ref_m, ref_h = jax.tree.map(lambda x: np.asarray(x, np.float64),
                                         (params, state[1][0].mu, state[1][0].hessian))
    if t % INTERVAL == 0:
      ref_h = jax.tree.map(lambda h, p: B2 * h + (1 - B2) * (2 * p * p - 0.3), ref_h, ref_p)
    ref_m = jax.tree.map(lambda m, gi: B1 * m + (1 - B1) * gi, ref_m, g)
    ratio = jax.tree.map(lambda m, h: m / np.maximum(RHO * h, EPS), ref_m, ref_h)
    flat_ratio = np.concatenate([r.ravel() for r in jax.tree.leaves(ratio)])
    flat_h = np.concatenate([h.ravel() for h in jax.tree.leaves(ref_h)])
    lr = _learning_rate(t)
    ref_p = jax.tree.map(lambda p, r, decay: p - lr * (np.clip(r, -1, 1) + WD * decay * p),
                         ref_p, ratio, mask)

    params, state = step(params, state, grads[t])
    inner = state[1][0]
    assert int(inner.count) == t + 1
    for got, want in ((params, ref_p), (inner.mu, ref_m), (inner.hessian, ref_h)):
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    stats = sophia_lib.sophia_stats(state)
    want_stats = {'win_rate': np.mean(np.abs(flat_ratio) < 1),
                  'clip_fraction': np.mean(np.abs(flat_ratio) >= 1),
                  'hessian_mean': flat_h.mean(), 'hessian_max': flat_h.max(),
                  'hessian_nonpositive': np.mean(flat_h <= 0)}
    for name, want in want_stats.items():
      np.testing.assert_allclose(stats[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
    win_rates.append(want_stats['win_rate'])
    nonpositive.append(want_stats['hessian_nonpositive'])
  # The case is informative: clipped and unclipped coordinates and floored (h <= 0) entries occur.
  assert any(0 < w < 1 for w in win_rates) and max(nonpositive) > 0


def test_relation_to_optax_contrib(seed):
  """optax.contrib.sophia vs this module, fed the same gradients, parameters and estimator.

  Documented differences: contrib bias-corrects the momentum (m / (1 - b1^(t+1))) and computes the
  step from the Hessian EMA as it stood *before* this step's refresh, where Algorithm 3 (and this
  module) refreshes first. Its `gamma` is our `rho`, its `clip_threshold` our `clip`; decay and
  learning rate are chained the same way. So, with h_{-1} = 0, contrib's update at step t is
  -lr (clip(m_t / (1 - b1^(t+1)) / max(rho h_{t-1}, eps), 1) + wd theta_t), while the two states
  agree exactly on m_t and h_t. Their Hutchinson estimator draws its probe from split(key)[1] with
  optax.tree.random_like, so ours given that key is the same estimate.
  """
  rng = np.random.default_rng(seed)
  shapes = {'w': (3, 4), 'b': (4,)}
  make = lambda scale: {k: jnp.asarray(rng.standard_normal(s) * scale, jnp.float32)
                        for k, s in shapes.items()}
  lr, wd, b1, b2, rho, eps, k = 0.5, 0.1, 0.9, 0.7, 0.2, 1e-8, 3

  fixed = optax.GradientTransformationExtraArgs(  # contrib's estimator slot, made deterministic
      lambda p: optax.EmptyState(),
      lambda updates, state, params=None, **kw: (_fake_hessian(params), state))
  theirs = optax.contrib.sophia(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd, gamma=rho,
                                clip_threshold=1.0, update_interval=k, hessian_diagonal_fn=fixed)
  ours = sophia_lib.sophia(lr, b1=b1, b2=b2, rho=rho, eps=eps, weight_decay=wd,
                           update_interval=k, clip=1.0)
  update_theirs = jax.jit(theirs.update)
  update_ours = jax.jit(functools.partial(ours.update, hessian_fn=_fake_hessian))
  params = make(1.0)
  s_theirs, s_ours = theirs.init(params), ours.init(params)
  previous_h = jax.tree.map(jnp.zeros_like, params)
  differs = False
  for t in range(8):
    params, grads = make(1.0), make(0.5)
    u_theirs, s_theirs = update_theirs(grads, s_theirs, params)
    u_ours, s_ours = update_ours(grads, s_ours, params)
    mine = s_ours[0]
    _assert_trees_close(s_theirs[0].mu, mine.mu, rtol=1e-6)
    _assert_trees_close(s_theirs[0].nu, mine.hessian, rtol=1e-6)
    predicted = jax.tree.map(
        lambda m, h, p: -lr * (jnp.clip(m / (1 - b1 ** (t + 1)) / jnp.maximum(rho * h, eps), -1, 1)
                               + wd * p),
        mine.mu, previous_h, params)
    _assert_trees_close(u_theirs, predicted)
    differs |= not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(u_theirs),
                                                         jax.tree.leaves(u_ours)))
    previous_h = mine.hessian
  assert differs  # the relation above is not an identity on this case

  loss = lambda p: jnp.sum(jnp.sin(p['w']) ** 2) * jnp.sum(p['b'] ** 3)
  key = jax.random.key(seed)
  estimator = optax.contrib.hutchinson_estimator_diag_hessian(random_seed=key)
  reference = jax.jit(lambda p: estimator.update(None, estimator.init(p), p, obj_fn=loss)[0])(
      params)
  mine = jax.jit(functools.partial(sophia_lib.hutchinson, loss))(params, jax.random.split(key)[1])
  _assert_trees_close(mine, reference, rtol=1e-6)


def test_jit_compiles_once_matches_eager_and_refreshes_on_schedule(seed):
  """One trace for all steps (refresh or not), eager == jit, and the estimator runs only on
  steps 0, k, 2k, ...: counted by a host callback under jit and by a Python counter without jit
  (where lax.cond calls only the branch taken). One leaf keeps the op-by-op compiles few."""
  rng = np.random.default_rng(seed)
  params = {'w': jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)}
  x = jnp.asarray(rng.standard_normal((32, 8)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((32, 4)), jnp.float32)
  loss = lambda p: jnp.mean(jnp.tanh(x @ p['w'] - y) ** 2)
  opt = sophia_lib.sophia(0.05, rho=0.05, b2=0.5, update_interval=3)
  traces, refreshes, python_calls = [], [], []

  def step(params, state, key):
    traces.append(1)

    def hessian_fn(p):
      jax.debug.callback(lambda: refreshes.append(1))
      python_calls.append(1)
      return sophia_lib.hutchinson(loss, p, key)

    updates, state = opt.update(jax.grad(loss)(params), state, params, hessian_fn=hessian_fn)
    return optax.apply_updates(params, updates), state

  jitted = jax.jit(step)
  steps, eager_steps = 7, 4
  p_jit, s_jit = params, opt.init(params)
  for t in range(steps):
    p_jit, s_jit = jitted(p_jit, s_jit, jax.random.key(seed + t))
    jax.block_until_ready(p_jit)
    assert len(refreshes) == t // 3 + 1
    if t == eager_steps - 1:
      after_jit = (p_jit, s_jit)
  assert len(traces) == 1

  python_calls.clear()
  p_eager, s_eager = params, opt.init(params)
  with jax.disable_jit():  # op by op: refresh steps 0 and 3, plain steps 1 and 2
    for t in range(eager_steps):
      p_eager, s_eager = step(p_eager, s_eager, jax.random.key(seed + t))
      assert len(python_calls) == t // 3 + 1
  _assert_trees_close(after_jit, (p_eager, s_eager))
  assert 0 < float(sophia_lib.sophia_stats(s_jit)['win_rate']) <= 1


def test_sharded_matches_single_device(seed):
  """Sophia-H under jit with params split over an 8-device mesh (leading dims 8 and 16 on 'x')
  equals the same steps on one device: the probe and the win rate are global quantities."""
  rng = np.random.default_rng(seed)
  params = {'w1': jnp.asarray(rng.standard_normal((8, 16)) * 0.5, jnp.float32),
            'w2': jnp.asarray(rng.standard_normal((16, 4)) * 0.5, jnp.float32),
            'b2': jnp.zeros((4,), jnp.float32)}
  x = jnp.asarray(rng.standard_normal((32, 8)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 4, 32), jnp.int32)

  def loss(p, x, y):
    logits = jnp.tanh(x @ p['w1']) @ p['w2'] + p['b2']
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  opt = sophia_lib.sophia(0.05, rho=0.05, b2=0.5, update_interval=2)

  def run(params, x, y):
    @jax.jit
    def step(params, state, key):
      grads = jax.grad(loss)(params, x, y)
      hessian_fn = functools.partial(sophia_lib.hutchinson, lambda q: loss(q, x, y), key=key)
      updates, state = opt.update(grads, state, params, hessian_fn=hessian_fn)
      return optax.apply_updates(params, updates), state

    state = jax.jit(opt.init)(params)
    for t in range(4):
      params, state = step(params, state, jax.random.key(seed + t))
    return params, state

  mesh = Mesh(np.array(jax.devices()), ('x',))
  specs = {'w1': P('x'), 'w2': P('x'), 'b2': P()}
  sharded_params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
  assert len(sharded_params['w1'].sharding.device_set) == 8
  replicated = NamedSharding(mesh, P())
  sharded = run(sharded_params, jax.device_put(x, replicated), jax.device_put(y, replicated))
  one = jax.devices()[0]
  single = run(jax.device_put(params, one), jax.device_put(x, one), jax.device_put(y, one))
  assert len(single[0]['w1'].sharding.device_set) == 1
  _assert_trees_close(sharded, single)
