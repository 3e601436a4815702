"""Early-exit heads: exit losses equal a hand computation, the weight schedules and curricula, the
confidence measures, the calibrated threshold, the stack cut into pieces equals the whole, and the
train step logs per-exit losses and accuracies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effjax.models import early_exit, layers
from effjax.models import lm as lm_lib
from tests.helpers import build, random_batch, tiny_config


def _model(seed=0, **overrides):
  config = tiny_config(init_std=0.1, **overrides)
  return lm_lib.LM(config.model, rngs=nnx.Rngs(seed)), config


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize('head', ['shared', 'norm', 'own'])
def test_exit_losses_equal_hand_computation(head):
  model, _ = _model(exit_layers='1', exit_head=head, scan_layers=False, num_layers=2)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, 259, (2, 16)))
  targets = jnp.asarray(rng.integers(3, 259, (2, 16)))
  weights = jnp.asarray(rng.random((2, 16)) > 0.2, jnp.float32)
  exits, final, _ = early_exit.hidden_states(model, tokens)
  np.testing.assert_allclose(final, model.features(tokens), rtol=1e-5, atol=1e-5)

  # By hand: the first layer, the exit's norm and projection, numpy cross-entropy and KL.
  positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
  h = model.groups[0](model.embed(tokens), layers.Context(positions=positions, segment_ids=None))
  np.testing.assert_allclose(exits[0], h, rtol=1e-5, atol=1e-5)
  x = np.asarray(h, np.float64)
  scale = (model.exit_heads.norms[0].scale[...] if head != 'shared'
           else model.final_norm.scale[...])
  xn = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * np.asarray(scale)
  w = np.asarray(model.exit_heads.projections[0][...] if head == 'own'
                 else model.embedding[...].T, np.float64)
  logp = _log_softmax(xn @ w)
  t, wt = np.asarray(targets), np.asarray(weights)
  ce = -(np.take_along_axis(logp, t[..., None], -1)[..., 0] * wt).sum()
  correct = ((logp.argmax(-1) == t) * wt).sum()
  teacher = _log_softmax(np.asarray(final, np.float64) @ np.asarray(model.embedding[...].T) / 2.0)
  student = _log_softmax(xn @ w / 2.0)
  kl = 4.0 * ((np.exp(teacher) * (teacher - student)).sum(-1) * wt).sum()
  for chunk in (0, 4):
    sums = early_exit.exit_losses(model, exits, final, targets, weights, chunk=chunk,
                                  distill_temperature=2.0)
    np.testing.assert_allclose(sums['ce'][0], ce, rtol=1e-4)
    np.testing.assert_allclose(sums['correct'][0], correct)
    np.testing.assert_allclose(sums['kl'][0], kl, rtol=1e-4, atol=1e-4)


def test_pieces_of_the_stack_equal_the_whole_scanned_and_not():
  for scan in (True, False):
    model, _ = _model(pattern='attention:mlp, gla:mlp', num_layers=4, exit_layers='1,3',
                      scan_layers=scan, scan_chunk=4)
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, 259, (2, 12)))
    exits, final, _ = nnx.jit(early_exit.hidden_states)(model, tokens)
    np.testing.assert_allclose(final, nnx.jit(lambda m, t: m.features(t))(model, tokens),
                               rtol=1e-5, atol=1e-5)
    assert early_exit.pieces(model.cfg, 0, 1) == [('blocks', 0, 0, 1)]
    assert early_exit.pieces(model.cfg, 1, 4) == [('blocks', 0, 1, 2), ('groups', 1, 2)]
    assert len(exits) == 2 and exits[0].shape == final.shape


def test_loss_weight_schedules_and_curricula():
  _, config = _model(num_layers=6, exit_layers='1,3,5')
  t = config.train
  exits, layers_ = (1, 3, 5), 6
  w, f = early_exit.loss_weights(t, exits, layers_, 0)
  np.testing.assert_allclose(w, [1, 1, 1]) and np.testing.assert_allclose(f, 1)
  t.exit_loss_schedule, t.exit_loss_scale = 'linear', 0.5
  w, f = early_exit.loss_weights(t, exits, layers_, 0)
  np.testing.assert_allclose(w, [0.5 / 6, 1.5 / 6, 2.5 / 6])
  # LayerSkip: layer j (0-indexed) ~ s * sum_{i<=j} i; final ~ L - 1 + s * sum_{i<=L-2} i.
  t.exit_loss_schedule, t.exit_loss_scale = 'layerskip', 0.2
  raw = np.array([0.2 * 0, 0.2 * (0 + 1 + 2), 0.2 * (0 + 1 + 2 + 3 + 4)])
  final = 5 + 0.2 * (0 + 1 + 2 + 3 + 4)
  w, f = early_exit.loss_weights(t, exits, layers_, 0)
  np.testing.assert_allclose(w, raw / (raw.sum() + final), rtol=1e-6)
  np.testing.assert_allclose(f, final / (raw.sum() + final), rtol=1e-6)
  t.exit_curriculum, t.exit_curriculum_period = 'rotational', 2
  w0, _ = early_exit.loss_weights(t, exits, layers_, 0)
  w1, f1 = early_exit.loss_weights(t, exits, layers_, 1)
  assert w0[1] == 0 and w1[0] == w1[2] == 0 and w1[1] > 0
  np.testing.assert_allclose(w1[1] + f1, 1.0, rtol=1e-6)
  t.exit_loss_schedule, t.exit_curriculum, t.exit_curriculum_steps = 'constant', 'gradual', 30
  on = [np.asarray(early_exit.loss_weights(t, exits, layers_, s)[0]) > 0 for s in (0, 10, 20)]
  assert [list(o) for o in on] == [[False, False, True], [False, True, True], [True, True, True]]
  t.exit_curriculum, t.exit_loss_weights = 'none', '0.1,0.2,0.3'
  np.testing.assert_allclose(early_exit.loss_weights(t, exits, layers_, 0)[0], [0.1, 0.2, 0.3])


def test_confidence_measures():
  logits = jnp.log(jnp.asarray([[0.7, 0.2, 0.1, 0.0 + 1e-9], [0.25, 0.25, 0.25, 0.25]]))
  np.testing.assert_allclose(early_exit.confidence('softmax', logits), [0.7, 0.25], rtol=1e-5)
  np.testing.assert_allclose(early_exit.confidence('margin', logits), [0.5, 0.0], atol=1e-5)
  ent = -(0.7 * np.log(0.7) + 0.2 * np.log(0.2) + 0.1 * np.log(0.1))
  np.testing.assert_allclose(early_exit.confidence('entropy', logits), [1 - ent / np.log(4), 0.0],
                             atol=1e-5)
  a, b = jnp.asarray([[1.0, 0.0], [1.0, 1.0]]), jnp.asarray([[0.0, 2.0], [2.0, 2.0]])
  np.testing.assert_allclose(early_exit.confidence('state', None, a, b), [0.0, 1.0], atol=1e-6)


def test_calibration_picks_the_threshold_its_tolerance_implies():
  # One exit, ten tokens: confidences 0.05 .. 0.95; the exit's token is wrong at 0.35 and 0.75.
  conf = np.round(np.arange(0.05, 1.0, 0.1), 2)[None]
  agree = np.ones_like(conf, bool)
  agree[0, 3] = agree[0, 7] = False
  # Threshold 0.8: tokens 0.85, 0.95 exit, both right -> 0 disagreement. Lower, 0.75 exits: 1/10.
  assert early_exit.calibrate_threshold(conf, agree, 0.0) == pytest.approx(0.75)
  assert early_exit.disagreement(conf, agree, 0.75) == 0.0  # strictly greater exits
  assert early_exit.disagreement(conf, agree, 0.65) == pytest.approx(0.1)
  # Tolerance 0.1: down to 0.35 (0.35 itself does not exit); below it both wrong ones exit.
  assert early_exit.calibrate_threshold(conf, agree, 0.1) == pytest.approx(0.35)
  assert early_exit.calibrate_threshold(conf, agree, 0.2) == pytest.approx(0.05)
  # Two exits: the first exit wins where both are confident.
  conf2 = np.stack([conf[0], np.full(10, 0.99)])
  agree2 = np.stack([agree[0], np.ones(10, bool)])
  assert early_exit.disagreement(conf2, agree2, 0.5) == pytest.approx(0.1)
  assert list(early_exit.first_exit(conf2, 0.5)[:6]) == [1, 1, 1, 1, 1, 0]


@pytest.mark.parametrize('head', ['shared', 'norm', 'own'])
def test_param_count_with_exit_heads(head):
  model, config = _model(exit_layers='1', exit_head=head, tie_embeddings=False)
  built = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert lm_lib.count_params(config.model) == built


def test_train_step_logs_exit_losses(tmp_path):
  config = tiny_config(exit_layers='1', exit_head='norm')
  config.train.batch_size, config.train.grad_accum_steps = 8, 2
  config.train.exit_distill_weight = 0.5
  _, _, setup = build(config, jax.devices()[:1])
  mesh = setup.mesh
  from effjax.parallel import sharding as shd
  from effjax.train import step as step_lib
  with jax.set_mesh(mesh), shd.axis_rules(shd.rules_from_config(config.sharding_rules)):
    state = setup.init(0)
    train_step = step_lib.make_train_step(setup, **step_lib.exit_options(config))
    batch = step_lib.device_batch(setup, random_batch(np.random.default_rng(0), 8, 32), 2)
    state, metrics = train_step(state, batch)
    ev = step_lib.make_eval_step(setup)(state['params'], step_lib.device_batch(
        setup, random_batch(np.random.default_rng(1), 8, 32), 1))
  assert {'exit1_loss', 'exit1_accuracy', 'exit1_weight', 'exit1_distill'} <= set(metrics)
  assert 4.0 < float(metrics['exit1_loss']) < 8.0 and 0 <= float(metrics['exit1_accuracy']) <= 1
  assert float(ev['exit1_loss_sum']) > 0
