"""Speculative decoding: greedy output equals plain greedy token for token (draft model and
self-speculative, attention and a sliding-window + Mamba-2 stack whose rejected drafts need the
ring's spare slots and the recurrent snapshots); a batch of prompts of different lengths equals
each prompt alone; the rejection rule's output distribution equals the target's (exactly, by
enumeration, and by a chi-square test of the sampler)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats as scipy_stats

from effjax.infer import generate as gen
from effjax.infer import sampling
from effjax.infer.sampling import Sampler
from effjax.models import lm as lm_lib
from tests.helpers import tiny_config

FIELDS = dict(init_std=0.1, attention_backend='reference', attention_window=6, ssm_state_dim=8,
              ssm_head_dim=16, scan_chunk=4, num_layers=4, exit_layers='1,2', exit_head='norm')


def _split(seed, **overrides):
  config = tiny_config(**{**FIELDS, **overrides})
  return nnx.split(lm_lib.LM(config.model, rngs=nnx.Rngs(seed)))


def _decode(split, method, prompts, draft=None, **kw):
  options = gen.Options(method=method, max_new_tokens=kw.pop('max_new', 12),
                        sampler=kw.pop('sampler', Sampler(vocab_limit=259)), gamma=3, **kw)
  return gen.Decoder(*split, options, draft=draft).generate(prompts)


@pytest.mark.parametrize('pattern', ['attention:mlp', 'sliding_window:mlp, mamba2:mlp'])
def test_greedy_speculative_and_self_speculative_equal_plain(pattern):
  target = _split(0, pattern=pattern)
  draft = _split(1, pattern='attention:mlp', num_layers=2, exit_layers='')
  rng = np.random.default_rng(0)
  prompts = [[int(t) for t in rng.integers(3, 259, n)] for n in (5, 9)]
  plain = _decode(target, 'plain', prompts).tokens
  reference = gen.generate_tokens_cached(*target, prompts[0], 12, temperature=0, top_k=0, seed=0,
                                         vocab_limit=259)
  assert plain[0] == reference
  spec = _decode(target, 'speculative', prompts, draft=draft)
  self_spec = _decode(target, 'self_speculative', prompts)
  assert spec.tokens == plain and self_spec.tokens == plain
  assert spec.stats['accepted'] < spec.stats['drafted']  # rejections (and rollbacks) happened
  assert self_spec.stats['accepted'] < self_spec.stats['drafted']


def test_batch_of_prompts_of_different_lengths_equals_each_alone():
  target = _split(0, pattern='attention:mlp, mamba2:mlp')
  rng = np.random.default_rng(2)
  prompts = [[int(t) for t in rng.integers(3, 259, n)] for n in (3, 17, 8)]
  batch = _decode(target, 'plain', prompts, max_new=8).tokens
  for prompt, row in zip(prompts, batch):
    assert _decode(target, 'plain', [prompt], max_new=8).tokens[0] == row


def test_stop_tokens_and_sampling_with_a_seed():
  target = _split(0)
  prompt = [[5, 6, 7, 8]]
  full = _decode(target, 'plain', prompt).tokens[0]
  stopped = _decode(target, 'plain', prompt, stop_tokens=(full[3],)).tokens[0]
  assert stopped == full[:full.index(full[3]) + 1]
  hot = Sampler(temperature=1.0, top_k=20, top_p=0.9, vocab_limit=259)
  a = _decode(target, 'plain', prompt, sampler=hot, seed=3).tokens
  assert a == _decode(target, 'plain', prompt, sampler=hot, seed=3).tokens
  assert a != _decode(target, 'plain', prompt, sampler=hot, seed=4).tokens
  # A draft identical to the target has p == q: every draft is accepted, also when sampling.
  same = _decode(target, 'speculative', prompt, draft=target, sampler=hot, seed=3)
  assert same.stats['acceptance_rate'] == 1.0


def _pq(v, seed):
  rng = np.random.default_rng(seed)
  p, q = rng.dirichlet(np.ones(v)), rng.dirichlet(np.ones(v) * 0.5)
  q[0] = 0.0  # the draft never proposes token 0, which the target still likes
  return jnp.asarray(p, jnp.float32), jnp.asarray(q / q.sum(), jnp.float32)


def test_rejection_rule_distribution_is_the_target_exactly():
  """Exact enumeration over a 5-token vocabulary with the rule's own two pieces."""
  for seed in range(5):
    p, q = _pq(5, seed)
    accept = sampling.acceptance_probability(p, q)  # min(1, p(x)/q(x)) for each drafted x
    rejected_mass = jnp.sum(q * (1 - accept))
    out = q * accept + rejected_mass * sampling.residual(p, q)
    np.testing.assert_allclose(out, p, atol=1e-6)


def test_rejection_sampler_chi_square():
  """The sampler itself (drafts from q, verify) vs the target, first and second token jointly.

  N = 200,000 draws of (token 1, token 2) over 4 x 4 cells, chi-square at alpha = 1e-3 with a
  fixed seed. Power: a shift of 0.01 probability between two cells of mass ~1/16 gives a
  noncentrality N * 2 * 0.01^2 / (1/16) = 640 on 15 degrees of freedom: power ~ 1.
  """
  v, n = 4, 200_000
  p, q = _pq(v, 7)
  key_draft, key_verify = jax.random.split(jax.random.key(0))
  drafts = jax.random.categorical(key_draft, jnp.log(q), shape=(n, 2)).astype(jnp.int32)
  p_bgv = jnp.broadcast_to(p, (n, 3, v))
  q_bgv = jnp.broadcast_to(q, (n, 2, v))
  accepted, choice = sampling.verify(p_bgv, q_bgv, drafts, key_verify)
  # Per row (batch of one): token 1 = choice[0]; token 2 = the draft if kept, else (rejected at
  # index 0) the next round's first token, drawn again the same way: emulate with choice[1] of
  # rows that kept draft 0 only, which is also exactly p.
  first = np.asarray(choice[:, 0])
  counts = np.bincount(first, minlength=v)
  assert scipy_stats.chisquare(counts, n * np.asarray(p, np.float64)).pvalue > 1e-3
  kept = np.asarray(accepted) >= 1
  pairs = np.asarray(choice[kept][:, :2])
  joint = np.bincount(pairs[:, 0] * v + pairs[:, 1], minlength=v * v)
  expected = np.outer(np.asarray(q * sampling.acceptance_probability(p, q), np.float64),
                      np.asarray(p, np.float64)).ravel()
  expected = expected / expected.sum() * kept.sum()
  assert not joint[expected == 0].any()  # never-drafted first tokens never come out kept
  cells = expected >= 5  # the chi-square approximation needs a few expected counts per cell
  observed, expected = joint[cells], expected[cells]
  assert scipy_stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue > 1e-3
  # And the lockstep commit keeps both rows' tokens at the minimum accepted index.
  m, tokens = sampling.commit(drafts[:2], choice[:2], accepted[:2])
  assert int(m) == int(np.min(np.asarray(accepted[:2])))
  for row in range(2):
    assert list(np.asarray(tokens[row, :int(m)])) == list(np.asarray(drafts[row, :int(m)]))
    assert int(tokens[row, int(m)]) == int(choice[row, int(m)])


def test_greedy_rule_is_argmax():
  p = jax.nn.one_hot(jnp.asarray([[2, 1, 3]]), 4)
  q = jax.nn.one_hot(jnp.asarray([[2, 0]]), 4)
  accepted, choice = sampling.verify(p, q, jnp.asarray([[2, 0]]), jax.random.key(0))
  assert int(accepted[0]) == 1 and list(np.asarray(choice[0, :2])) == [2, 1]


def test_greedy_speculative_accepting_every_draft_equals_plain():
  """A draft identical to the target: every round accepts all gamma drafts and takes the
  target's bonus token, the path a well-matched draft runs most; the output is plain greedy's."""
  target = _split(0, exit_layers='')
  rng = np.random.default_rng()
  prompts = [[int(t) for t in rng.integers(3, 259, n)] for n in (6, 13)]
  spec = _decode(target, 'speculative', prompts, draft=target, max_new=20)
  assert spec.stats['acceptance_rate'] == 1.0
  assert spec.tokens == _decode(target, 'plain', prompts, max_new=20).tokens


def _equal_up_to_rounding_ties(split, prompts, got, want, vocab=259, rel=4 * 2.0**-8):
  """Token lists equal, or where a row first differs the full model's logits for the two tokens
  at that position are within `rel` (bf16 rounding by default) of the largest logit of each other
  (a random-init model's logits are nearly flat, so a product of gamma + 1 rows rounding one ulp
  differently from a product of one row may flip a tie; anything past the first flip follows
  from it)."""
  model = nnx.merge(*split)
  for prompt, g, w in zip(prompts, got, want):
    if g == w:
      continue
    i = next(k for k, (a, b) in enumerate(zip(g, w)) if a != b)
    logits = model(jnp.asarray([prompt + w[:i]], jnp.int32))[0, -1, :vocab].astype(jnp.float32)
    gap = abs(float(logits[g[i]]) - float(logits[w[i]]))
    scale = float(jnp.max(jnp.abs(logits)))
    assert gap <= rel * scale, (i, g[i], w[i], gap, scale)
    assert float(jnp.max(logits)) - float(logits[w[i]]) <= rel * scale


def test_greedy_speculative_equals_plain_in_bfloat16():
  """bf16 compute (the GPU's decoding dtype): the verification pass multiplies gamma + 1 rows
  where plain decoding multiplies one; the output is plain greedy's up to bf16 rounding ties."""
  target = _split(0, pattern='attention:mlp', compute_dtype='bfloat16')
  draft = _split(1, pattern='attention:mlp', num_layers=2, exit_layers='', compute_dtype='bfloat16')
  rng = np.random.default_rng()
  prompts = [[int(t) for t in rng.integers(3, 259, n)] for n in (5, 12)]
  plain = _decode(target, 'plain', prompts, max_new=24).tokens
  for method, kw in (('speculative', dict(draft=draft)), ('self_speculative', {})):
    out = _decode(target, method, prompts, max_new=24, **kw).tokens
    _equal_up_to_rounding_ties(target, prompts, out, plain)


@pytest.mark.parametrize('tied', [True, False])
def test_heads_keep_only_the_rows_that_can_be_drawn(tied):
  """A 384-entry model with a 259-entry tokenizer: the engine's heads (final, exits) keep 259
  rows; their logits are the full head's first 259, and decoding equals the masked model path."""
  from effjax.infer.engine import Engine
  target = _split(0, exit_layers='1,2', exit_head='own', tie_embeddings=tied)
  full, cut = Engine(*target), Engine(*target, vocab_limit=259)
  assert (full.vocab, cut.vocab) == (384, 259)
  assert full.param_bytes(0, 0) - cut.param_bytes(0, 0) == 125 * 64 * 4  # rows x width x f32
  x = jnp.asarray(np.random.default_rng().standard_normal((2, 3, 64)), jnp.float32)
  for head in (lambda e: e.head(e.arrays, x), lambda e: e.exit_head(e.arrays, 1, x)):
    np.testing.assert_allclose(head(cut), head(full)[..., :259], rtol=1e-6, atol=1e-6)
  prompt = [int(t) for t in np.random.default_rng().integers(3, 259, 7)]
  reference = gen.generate_tokens_cached(*target, prompt, 10, temperature=0, top_k=0, seed=0,
                                         vocab_limit=259)
  for method in ('plain', 'early_exit', 'self_speculative'):
    assert _decode(target, method, [prompt], max_new=10,
                   exit_policy=gen.ExitPolicy(1.0)).tokens[0] == reference


def test_the_study_locates_where_a_method_parts_from_plain_greedy():
  """experiments/early_exit/run_study.py's diagnostic: an equal output has no position; a
  changed token is found at its position, with the full model's logit gap there (a token the
  full model ranks first against one it does not: a gap above zero, plain's the argmax)."""
  import importlib.util
  import pathlib
  import types
  path = pathlib.Path(__file__).resolve().parents[2] / 'experiments' / 'early_exit' / 'run_study.py'
  spec = importlib.util.spec_from_file_location('run_study', path)
  study = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(study)
  target = _split(0)
  rng = np.random.default_rng()
  prompts = [[int(t) for t in rng.integers(3, 259, n)] for n in (5, 8)]
  plain = _decode(target, 'plain', prompts, max_new=10)
  reference = [types.SimpleNamespace(tokens=[t]) for t in plain.tokens]
  i = int(rng.integers(0, 10))
  changed = list(plain.tokens[1])
  changed[i] = (changed[i] + 1) % 259
  results = [types.SimpleNamespace(tokens=[plain.tokens[0]]),
             types.SimpleNamespace(tokens=[changed])]
  same, moved = study.first_differences(nnx.merge(*target), prompts, results, reference, 259)
  assert same == {'position': None, 'equal': True}
  assert moved['position'] == i and moved['plain_token'] == plain.tokens[1][i]
  assert moved['method_token'] == changed[i] and moved['plain_is_argmax']
  assert moved['relative_gap'] > 0


def test_output_major_engine_equals_training_layout():
  """The engine with wo stored output-major (infer.output_major's default; softmax and linear
  attention both have one) gives the plain and speculative greedy tokens of the training layout,
  and leaves the caller's params as they were."""
  from effjax.compress import weights as w_lib
  rng = np.random.default_rng()
  target = _split(int(rng.integers(1 << 30)), pattern='linear_attention:mlp, attention:mlp')
  draft = _split(int(rng.integers(1 << 30)), pattern='attention:mlp', num_layers=2, exit_layers='')
  before = [np.asarray(x) for x in jax.tree.leaves(target[1])]
  prompts = [[int(t) for t in rng.integers(3, 259, n)] for n in (4, 7)]
  for method in ('plain', 'speculative'):
    kw = dict(draft=draft) if method == 'speculative' else {}
    want = _decode(target, method, prompts, output_major=(), **kw).tokens
    got = gen.Decoder(*target, gen.Options(method=method, max_new_tokens=12, gamma=3,
                                           sampler=Sampler(vocab_limit=259)), **kw)
    stored = nnx.merge(got.engine.block_defs[-1], got.engine.arrays['blocks'][-1])
    assert isinstance(stored.mixer.wo, w_lib.OutputMajorWeight)
    # float32 in both layouts, summed in different orders: equal up to a near tie flipped.
    _equal_up_to_rounding_ties(target, prompts, got.generate(prompts).tokens, want, rel=1e-5)
  after = jax.tree.leaves(target[1])
  assert all(np.array_equal(a, b) and a.shape == b.shape for a, b in zip(before, after))


@pytest.mark.parametrize('kind', ['int8', 'w8a8'])
def test_engine_keeps_quantized_scales_in_float32(kind):
  """In bf16 decoding the engine casts float weights to bf16 once, but a quantized weight's
  scales (and W8A8's activation scale) stay float32, as the model's own forward reads them; with
  int8 weights its greedy tokens are the model's own cached decoding's (up to bf16 rounding ties)."""
  from effjax.compress import weights as w_lib
  from effjax.infer.engine import Engine
  config = tiny_config(**{**FIELDS, 'pattern': 'attention:mlp', 'compute_dtype': 'bfloat16',
                          'exit_layers': ''})
  config.compress.method = kind
  model = lm_lib.LM(config.model, rngs=nnx.Rngs(int(np.random.default_rng().integers(1 << 30))))
  w_lib.restructure(model, config)
  graphdef, params = nnx.split(model)
  engine = Engine(graphdef, params)
  leaves = jax.tree_util.tree_flatten_with_path(engine.arrays['blocks'])[0]
  scales = [x for p, x in leaves if {'scale', 'act_scale'} & {str(getattr(k, 'key', '')) for k in p}]
  assert scales and all(x.dtype == jnp.float32 for x in scales)
  assert engine.arrays['embedding'].dtype == jnp.bfloat16  # float weights: the decode dtype
  if kind == 'w8a8':
    # Not compared token by token: uncalibrated (scale 1.0) activations round to integers, so two
    # evaluation orders that differ by one bf16 ulp can differ by a whole activation step.
    return
  prompt = [int(t) for t in np.random.default_rng().integers(3, 259, 6)]
  want = gen.generate_tokens_cached(graphdef, params, prompt, 8, temperature=0, top_k=0, seed=0,
                                    vocab_limit=259)
  got = _decode((graphdef, params), 'plain', [prompt], max_new=8).tokens[0]
  _equal_up_to_rounding_ties((graphdef, params), [prompt], [got], [want])


@pytest.mark.parametrize('pattern', ['attention:mlp', 'sliding_window:mlp, mamba2:mlp'])
def test_folded_norms_decode_the_same(pattern):
  """infer.fold_norms: the RMSNorm gains (random, not ones) folded into q/k/v and gate/up, the
  projections fed the raw residual with its RMS factor: the engine's logits match the unfolded
  engine's at every step of a teacher-forced run (float32: to rounding), and greedy plain,
  early-exit (its cache fill goes through the modules' norms, now of gain one) and speculative
  decoding give the same tokens; the caller's model is untouched; a recurrent mixer's norm, and
  one feeding weights of another type (here q/k/v stored transposed), are left alone."""
  from effjax.infer.engine import Engine
  rng = np.random.default_rng()
  graphdef, params = _split(int(rng.integers(1 << 30)), pattern=pattern)
  params = jax.tree.map(lambda x: x, params)
  model = nnx.merge(graphdef, params)
  for _, m in nnx.iter_modules(model):  # gains away from one, so folding them matters
    if type(m).__name__ == 'RMSNorm':
      m.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, m.scale[...].shape), m.scale[...].dtype)
  graphdef, params = nnx.split(model)
  before = jax.tree.map(np.asarray, params)
  plain, folded = (Engine(graphdef, params, attention_kernel='xla', fold_norms=f)
                   for f in (False, True))
  assert any(m or f for m, f in folded.folded)
  for i, (mixer_folded, _) in enumerate(folded.folded):
    assert mixer_folded == folded.is_attention[i]  # mamba2's input norm is not folded
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), before)
  transposed = Engine(graphdef, params, attention_kernel='xla', fold_norms=True,
                      output_major=('wo', 'wq', 'wk', 'wv'))
  assert not any(m for m, _ in transposed.folded) and transposed.folded == [
      (False, f) for _, f in folded.folded]
  tokens = jnp.asarray(rng.integers(3, 259, (2, 9)), jnp.int32)
  start = jnp.asarray([0, 3], jnp.int32)

  def logits(engine):
    caches = engine.init_cache(2, 24)
    first, _, caches = engine.prefill(engine.arrays, tokens, start, caches, True)
    out = [first]
    for i, t in enumerate(rng_tokens):
      x, caches, _ = engine.run(engine.arrays, 0, engine.num_layers,
                                engine.embed(engine.arrays, jnp.asarray(t)[:, None]),
                                jnp.int32(9 + i), start, caches)
      out.append(engine.head(engine.arrays, x)[:, 0])
    return np.stack([np.asarray(o, np.float32) for o in out])

  rng_tokens = rng.integers(3, 259, (6, 2))
  np.testing.assert_allclose(logits(folded), logits(plain), rtol=1e-4, atol=1e-4)
  draft = _split(1, pattern='attention:mlp', num_layers=2, exit_layers='')
  prompts = [[int(t) for t in rng.integers(3, 259, n)] for n in (5, 12)]
  for method in ('plain', 'early_exit', 'self_speculative', 'speculative'):
    kw = dict(draft=draft) if method == 'speculative' else {}
    want = _decode((graphdef, params), method, prompts, **kw).tokens
    got = _decode((graphdef, params), method, prompts, fold_norms=True, **kw).tokens
    # float32 products in another order: equal, or first apart at a rounding tie
    _equal_up_to_rounding_ties((graphdef, params), prompts, got, want, rel=1e-5)
