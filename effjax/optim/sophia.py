"""Sophia: a clipped diagonal-Newton optimizer with a lightweight curvature estimate.

Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training". Per coordinate, the step divides a gradient EMA by an EMA of a diagonal Hessian
estimate and clips the ratio, so flat directions move by at most the learning rate while sharp ones
take Newton-sized steps. The curvature estimate is refreshed only every `update_interval` steps,
which keeps its cost (one extra forward/backward, or a Hessian-vector product) a few percent.

The rule implemented is the paper's Algorithm 3, with t counted from 0 here (so its
"t mod k = 1" becomes `count % k == 0`):

  m_t = b1 m_{t-1} + (1 - b1) g_t
  h_t = b2 h_{t-k} + (1 - b2) h^_t         if t % k == 0, else h_t = h_{t-1};  h starts at 0
  theta_{t+1} = theta_t - lr_t * wd * theta_t - lr_t * clip(m_t / max(rho * h_t, eps), 1)

Conventions, and why:

- `rho` is the paper's gamma. It multiplies h *inside* the max, and the clip bound is `clip` (1 in
  the paper), so every coordinate moves by at most lr_t and `rho` alone sets where clipping starts.
  A formulation that clips at c instead, clip(m / max(h, eps), c), is this rule with rho = c, eps
  and the learning rate both scaled by c, since clip(z, c) = c * clip(z / c, 1).
- eps enters through a max, not added to the denominator. Hutchinson estimates (and so their EMA)
  can be negative; max(rho * h, eps) then sends that coordinate to the clip (a sign-of-momentum
  step of size lr_t), as the paper prescribes, while an added eps would flip the step's direction.
- Neither EMA is bias-corrected (Algorithm 3 has no correction). Since h starts at 0, the first
  refreshes leave rho * h tiny and nearly every coordinate is clipped: early training is
  sign-momentum until the curvature EMA has warmed up. The win rate in the state shows when.
- The refresh happens *before* the step that uses it, on steps 0, k, 2k, ... with the Hessian
  estimated at the same parameters as the gradient. The authors' released training loop instead
  refreshes after the optimizer step on iterations k-1, 2k-1, ..., and `optax.contrib.sophia`
  applies the EMA from before the refresh; both use a new estimate one step later than here.
  `optax.contrib.sophia` also bias-corrects m; tests/optim/test_sophia.py pins the exact relation.
- m and h are kept in float32 whatever the parameter dtype: the clip decision compares
  m / (rho * h) with 1, and an EMA step of (1 - b1) = 3.5% of a difference is only a few bfloat16
  rounding steps (relative spacing 2**-8), so bfloat16 moments would mostly round it away.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

HessianFn = Callable[[Any], Any]
PROBE_DISTRIBUTIONS = ('rademacher', 'gaussian')


class ScaleBySophiaState(NamedTuple):
  """Sophia's moments plus scalar statistics of the last update, kept for logging.

  The statistics live in the state (rather than being returned) because an optax update returns
  only (updates, state); the train step can read them with `sophia_stats` without recomputing.
  """
  count: jax.Array  # int32 steps taken; a refresh happens when count % update_interval == 0
  mu: optax.Updates  # EMA of gradients (b1), float32
  hessian: optax.Updates  # EMA of diagonal Hessian estimates (b2), float32
  win_rate: jax.Array  # fraction of coordinates whose ratio was not clipped in the last update
  hessian_mean: jax.Array  # mean of the Hessian EMA over all coordinates
  hessian_max: jax.Array  # max of the Hessian EMA
  hessian_nonpositive: jax.Array  # fraction of EMA entries <= 0 (they take the eps floor)


def _f32(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _tree_sum(fn: Callable[[jax.Array], jax.Array], tree: Any) -> jax.Array:
  """Per-leaf reductions added in float32 (counts too: an int32 count overflows past 2**31)."""
  return sum((fn(x) for x in jax.tree.leaves(tree)), jnp.zeros((), jnp.float32))


def _tree_size(tree: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def _hessian_summary(hessian: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  size = max(_tree_size(hessian), 1)
  leaves = jax.tree.leaves(hessian)
  mean = _tree_sum(jnp.sum, hessian) / size
  peak = (jnp.max(jnp.stack([jnp.max(x) for x in leaves])) if leaves
          else jnp.zeros((), jnp.float32))
  nonpositive = _tree_sum(lambda x: jnp.sum(x <= 0, dtype=jnp.float32), hessian) / size
  return mean, peak, nonpositive


def scale_by_sophia(b1: float = 0.965, b2: float = 0.99, rho: float = 0.04, eps: float = 1e-12,
                    update_interval: int = 10,
                    clip: float = 1.0) -> optax.GradientTransformationExtraArgs:
  """Sophia's preconditioned, clipped direction clip(m / max(rho * h, eps), clip); see the module.

  `update(updates, state, params, *, hessian_fn)` needs `hessian_fn(params)`: a callable returning
  a diagonal Hessian estimate shaped like params (for example `functools.partial` of
  `gauss_newton_bartlett` or `hutchinson` closed over the batch and a fresh key). It runs under
  `jax.lax.cond`, so it is evaluated only on refresh steps while the jitted step is compiled once;
  the estimate is taken at the same `params` as the gradient, as in the paper. The returned
  direction has each gradient leaf's dtype; the sign convention is that of a gradient (chain
  `optax.scale_by_learning_rate` to descend).
  """
  if update_interval < 1:
    raise ValueError(f'update_interval={update_interval} must be >= 1')

  def init_fn(params):
    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    scalar = jnp.zeros((), jnp.float32)
    return ScaleBySophiaState(count=jnp.zeros((), jnp.int32), mu=zeros, hessian=zeros,
                              win_rate=scalar, hessian_mean=scalar, hessian_max=scalar,
                              hessian_nonpositive=scalar)

  def update_fn(updates, state: ScaleBySophiaState, params=None, *,
                hessian_fn: Optional[HessianFn] = None, **extra_args):
    del extra_args  # other transformations' extra arguments pass through a chain
    if hessian_fn is None:
      raise ValueError(
          'Sophia needs the curvature estimator: call update(grads, state, params, '
          'hessian_fn=fn) with fn(params) -> diagonal Hessian estimate shaped like params, e.g. '
          'functools.partial(effjax.optim.sophia.hutchinson, loss_fn, key=key).')
    if params is None:
      raise ValueError('Sophia estimates the Hessian at the current parameters: pass params to '
                       'update(grads, state, params, hessian_fn=...).')

    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * jnp.asarray(g, jnp.float32),
                      state.mu, updates)

    def refresh(hessian):
      estimate = _f32(hessian_fn(params))
      return jax.tree.map(lambda h, e: b2 * h + (1 - b2) * e, hessian, estimate)

    hessian = jax.lax.cond(state.count % update_interval == 0, refresh, lambda h: h,
                           state.hessian)
    ratio = jax.tree.map(lambda m, h: m / jnp.maximum(rho * h, eps), mu, hessian)
    kept = _tree_sum(lambda r: jnp.sum(jnp.abs(r) < clip, dtype=jnp.float32), ratio)
    win_rate = kept / max(_tree_size(ratio), 1)
    direction = jax.tree.map(lambda r, g: jnp.clip(r, -clip, clip).astype(jnp.result_type(g)),
                             ratio, updates)
    mean, peak, nonpositive = _hessian_summary(hessian)
    new_state = ScaleBySophiaState(count=optax.safe_int32_increment(state.count), mu=mu,
                                   hessian=hessian, win_rate=win_rate, hessian_mean=mean,
                                   hessian_max=peak, hessian_nonpositive=nonpositive)
    return direction, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sophia(learning_rate: optax.ScalarOrSchedule, b1: float = 0.965, b2: float = 0.99,
           rho: float = 0.04, eps: float = 1e-12, weight_decay: float = 0.1,
           weight_decay_mask: Any = None, update_interval: int = 10,
           clip: float = 1.0) -> optax.GradientTransformationExtraArgs:
  """Sophia with decoupled weight decay: theta -= lr * (clip(m / max(rho * h, eps)) + wd * theta).

  The decay is added before the learning-rate scaling, so it is multiplied by the schedule like
  the paper's lr_t * wd * theta_t term (and like optax.adamw). `weight_decay_mask` is a tree of
  bools or a callable params -> tree, as for `optax.add_decayed_weights`. The defaults (b1 0.965,
  b2 0.99, rho 0.04, weight decay 0.1, refresh every 10 steps) are those of the authors' released
  Sophia-G optimizer. Pass `hessian_fn=` to `update`; `optax.chain` forwards it to the Sophia part
  and drops it for the others.
  """
  return optax.chain(
      scale_by_sophia(b1=b1, b2=b2, rho=rho, eps=eps, update_interval=update_interval,
                      clip=clip),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def sophia_stats(opt_state: Any) -> dict[str, jax.Array]:
  """The logging statistics of the (single) Sophia state anywhere inside a chained optax state.

  The win rate is the paper's main health signal: the authors suggest tuning rho so that roughly
  10-50% of coordinates are not clipped; a rate near 0 means Sophia has degraded to sign-momentum.
  """
  found = [s for s in jax.tree.leaves(opt_state,
                                      is_leaf=lambda x: isinstance(x, ScaleBySophiaState))
           if isinstance(s, ScaleBySophiaState)]
  if len(found) != 1:
    raise ValueError(f'expected exactly one Sophia state in the optimizer state, found '
                     f'{len(found)}')
  s = found[0]
  return {'win_rate': s.win_rate, 'clip_fraction': 1.0 - s.win_rate,
          'hessian_mean': s.hessian_mean, 'hessian_max': s.hessian_max,
          'hessian_nonpositive': s.hessian_nonpositive}


def gauss_newton_bartlett(logits_fn: Callable[[Any], jax.Array], params: Any, key: jax.Array,
                          weights: Optional[jax.Array] = None) -> Any:
  """Sophia-G's estimate B * g_hat**2 of the Gauss-Newton diagonal of the mean cross-entropy.

  `logits_fn(params)` returns logits [..., vocab] for a batch the caller closed over; `weights`
  (broadcastable to logits.shape[:-1]) is a 0/1 mask of the tokens that count. Labels y_hat are
  drawn from the model's own softmax (with the sampling outside the gradient) and g_hat is the
  gradient of the weighted mean cross-entropy against y_hat. By Bartlett's identity each token's
  logit gradient softmax - onehot(y_hat) has zero mean given the inputs and covariance
  diag(p) - outer(p, p), and tokens are sampled independently, so E[g_hat g_hat^T] = GGN / B where
  GGN is the Gauss-Newton matrix of the mean loss and B the number of independently sampled terms:
  the number of (unmasked) *tokens*, not sequences. Multiplying by B therefore makes the diagonal
  unbiased; scaling by the number of sequences would shrink it by the sequence length (equivalent
  to dividing rho by it). The authors' released code likewise multiplies by batch size x block
  size. With non-binary weights the estimate is sum(w**2 diag(GGN_token)) / sum(w) rather than the
  GGN of the weighted mean.

  Parameters are upcast to float32 before differentiating, so bfloat16 models get a float32
  estimate (the model may still compute in its own dtype); the result is a float32 tree like
  params.
  """
  params32 = _f32(params)

  def sampled_loss(p):
    logits = jnp.asarray(logits_fn(p), jnp.float32)
    labels = jax.random.categorical(key, jax.lax.stop_gradient(logits), axis=-1)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    w = (jnp.ones_like(ce) if weights is None
         else jnp.broadcast_to(jnp.asarray(weights, jnp.float32), ce.shape))
    count = jnp.sum(w)
    return jnp.sum(ce * w) / jnp.maximum(count, 1.0), count

  grads, count = jax.grad(sampled_loss, has_aux=True)(params32)
  return jax.tree.map(lambda g: count * g * g, grads)


def hutchinson(loss_fn: Callable[[Any], jax.Array], params: Any, key: jax.Array,
               distribution: str = 'rademacher') -> Any:
  """Sophia-H's estimate u * (H u) (elementwise) of the Hessian diagonal of `loss_fn` at params.

  E[u * Hu] = diag(H) whenever the probe u has independent zero-mean unit-variance entries. The
  paper draws u from a Gaussian; Rademacher (+-1) probes are the default here because u_i**2 = 1
  removes the 2 H_ii**2 term from each coordinate's variance (leaving sum_{j!=i} H_ij**2), at the
  same expectation. H u is a forward-over-reverse product (jax.jvp of jax.grad), a small multiple
  of one gradient's cost, never the Hessian itself. Each leaf's probe comes from its own split of
  `key` (optax.tree.random_like), the draws optax.contrib's estimator makes from its subkey.
  Parameters are upcast to float32 first; the result is a float32 tree like params.
  """
  if distribution not in PROBE_DISTRIBUTIONS:
    raise ValueError(f'hutchinson distribution={distribution!r}; allowed: '
                     f'{", ".join(PROBE_DISTRIBUTIONS)}')
  params32 = _f32(params)
  sampler = jax.random.rademacher if distribution == 'rademacher' else jax.random.normal
  probe = optax.tree.random_like(key, params32, sampler, dtype=jnp.float32)
  grad_fn = jax.grad(lambda p: jnp.asarray(loss_fn(p), jnp.float32))
  _, hvp = jax.jvp(grad_fn, (params32,), (probe,))
  return jax.tree.map(lambda u, hu: u * hu, probe, hvp)
