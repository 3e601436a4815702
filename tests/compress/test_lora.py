"""LoRA: zero-initialised adapters leave every mixer's model unchanged, merging changes nothing,
the optimizer holds only adapter moments, and a step on an 8-device mesh equals one device's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effjax.compress import weights as w_lib
from effjax.models.lm import LM
from effjax.parallel import sharding as shd
from effjax.train import step as step_lib
from tests.helpers import build, comparable_updates, random_batch, tiny_config

VOCAB = ['embedding', 'unembedding']  # the vocabulary matrices lora_vocab_dtype narrows
PATTERNS = {
    'attention:mlp': 'wq,wk,wv,wo,w_gate,w_up,w_down',
    'gla:mlp': 'wq,wk,wv,wo,w_gate,w_up,w_down',
    'mamba2:none': 'w_z,w_x,w_out',
    'attention:moe': 'wq,wo,w_gate,w_up,w_down',
}


@pytest.mark.parametrize('pattern', list(PATTERNS))
def test_zero_init_equals_base_and_merged_equals_unmerged(pattern):
  config = tiny_config(pattern=pattern, ssm_head_dim=16, ssm_state_dim=16, moe_num_experts=4)
  config.compress.method = 'lora'
  config.compress.targets = PATTERNS[pattern]
  config.compress.lora_rank = 4
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 259, (2, 16)), jnp.int32)
  model = LM(config.model, rngs=nnx.Rngs(0))
  base_logits = model(tokens)
  w_lib.restructure(model, config)
  adapted = [m for _, m in nnx.iter_modules(model) if isinstance(m, w_lib.LoRAWeight)]
  assert len(adapted) >= len(PATTERNS[pattern].split(','))  # gla has a w_gate of its own
  np.testing.assert_array_equal(model(tokens), base_logits)  # B = 0: exactly the base model
  for i, weight in enumerate(adapted):  # some training later: B no longer zero
    b = weight.lora_b[...]
    weight.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(i), b.shape, b.dtype)
  unmerged = model(tokens)
  assert float(jnp.max(jnp.abs(unmerged - base_logits))) > 1e-4
  merged = w_lib.densify(model)
  assert not [m for _, m in nnx.iter_modules(merged) if isinstance(m, w_lib.CompressedWeight)]
  np.testing.assert_allclose(merged(tokens), unmerged, rtol=2e-4, atol=2e-4)


def _lora_config():
  config = tiny_config()
  config.compress.method = 'lora'
  config.compress.lora_rank = 4
  config.optim.warmup_steps = 0
  return config


def test_optimizer_state_holds_only_adapter_moments():
  config = _lora_config()
  _, _, setup = build(config, jax.devices()[:1])
  arrays = [(jax.tree_util.keystr(p), leaf) for p, leaf in
            jax.tree_util.tree_flatten_with_path(setup.abstract_state['opt_state'])[0]
            if leaf.ndim]
  assert arrays and all('lora_a' in name or 'lora_b' in name for name, _ in arrays)
  adapters = [leaf for p, leaf in jax.tree_util.tree_flatten_with_path(
      setup.abstract_state['params'])[0] if 'lora_' in jax.tree_util.keystr(p)]
  # Adam's two moments per adapter, nothing per base weight.
  assert sum(a.size for _, a in arrays) == 2 * sum(a.size for a in adapters)


def _train(layout, batch, steps=3):
  config = _lora_config()
  comparable_updates(config)
  for axis, size in layout.items():
    config.mesh[axis] = size
  devices = jax.devices()[:int(np.prod(list(layout.values())))]
  mesh, rules, setup = build(config, devices)
  with jax.set_mesh(mesh), shd.axis_rules(rules):
    state = setup.init(seed=3)
    base = np.asarray(jax.device_get(state['params']['groups']['blocks'][0]['mixer']['wq']
                                     ['base'][...]))
    train_step = step_lib.make_train_step(setup)
    losses = []
    for _ in range(steps):
      state, metrics = train_step(state, step_lib.device_batch(setup, batch, 1))
      losses.append(float(metrics['loss']))
    wq = state['params']['groups']['blocks'][0]['mixer']['wq']
    return (losses, np.asarray(jax.device_get(wq['lora_b'][...])),
            np.asarray(jax.device_get(wq['base'][...])), base, wq['base'][...].sharding)


def _base_array(wq_state):
  """A quantized LoRA base of one weight's state as one numpy array (its integer values and
  scales concatenated, so any change shows)."""
  base = wq_state['base']
  return np.concatenate([np.asarray(jax.device_get(base['qvalue'][...]), np.float64).ravel(),
                         np.asarray(jax.device_get(base['scale'][...]), np.float64).ravel()])


def test_lora_step_on_8_device_mesh_equals_one_device():
  batch = random_batch(np.random.default_rng(), 16, 32)
  ref_losses, ref_b, ref_base, base0, _ = _train(dict(data=1, fsdp=1, tensor=1), batch)
  losses, b, base, _, sharding = _train(dict(data=2, fsdp=2, tensor=2), batch)
  assert ref_losses[-1] < ref_losses[0]
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  np.testing.assert_allclose(b, ref_b, rtol=1e-5, atol=1e-6)
  assert np.abs(ref_b).max() > 0  # the adapters trained
  np.testing.assert_array_equal(ref_base, base0)  # the base stayed frozen
  np.testing.assert_array_equal(base, base0)
  assert sharding.shard_shape(base.shape) == (2, 32, 2, 16)  # [layers, embed, heads, head_dim]


def test_bfloat16_base_halves_its_bytes_and_trains_only_the_adapters():
  """lora_base_dtype='bfloat16' and lora_vocab_dtype='bfloat16': the frozen projections and
  vocabulary matrices in bf16, the adapters float32; merging restores float32 everywhere."""
  config = _lora_config()
  config.compress.lora_base_dtype = 'bfloat16'
  config.compress.lora_vocab_dtype = 'bfloat16'
  _, _, setup = build(config, jax.devices()[:1])
  leaves = {jax.tree_util.keystr(p): leaf for p, leaf in
            jax.tree_util.tree_flatten_with_path(setup.abstract_state['params'])[0]}
  bases = [leaf for k, leaf in leaves.items() if "'base'" in k]
  adapters = [leaf for k, leaf in leaves.items() if 'lora_' in k]
  assert bases and all(b.dtype == jnp.bfloat16 for b in bases)
  assert leaves["['embedding'].value"].dtype == jnp.bfloat16  # frozen, read in bf16 anyway
  assert adapters and all(a.dtype == jnp.float32 for a in adapters)
  # The same model at zero-initialised adapters: the base model with bf16-rounded projections.
  tokens = jnp.asarray(np.random.default_rng().integers(3, 259, (2, 16)), jnp.int32)
  model = LM(config.model, rngs=nnx.Rngs(1))
  rounded = LM(config.model, rngs=nnx.Rngs(1))
  for path, w in nnx.iter_graph(rounded):  # the projections and the vocabulary matrices
    if isinstance(w, nnx.Param) and path[-1] in config.compress.targets.split(',') + VOCAB:
      w[...] = w[...].astype(jnp.bfloat16).astype(w[...].dtype)
  w_lib.restructure(model, config)
  np.testing.assert_allclose(model(tokens), rounded(tokens), rtol=1e-5, atol=1e-5)
  for weight in [m for _, m in nnx.iter_modules(model) if isinstance(m, w_lib.LoRAWeight)]:
    assert weight.dense().dtype == jnp.float32  # merging gives the source's parameter dtype
  assert all(p[...].dtype == jnp.float32 for _, p in nnx.iter_graph(w_lib.densify(model))
             if isinstance(p, nnx.Param))
  batch = random_batch(np.random.default_rng(), 16, 32)
  with jax.set_mesh(setup.mesh):
    state = setup.init(seed=2)
    base_before = jax.device_get(state['params']['groups']['blocks'][0]['mixer']['wq']['base'][...])
    state, metrics = step_lib.make_train_step(setup)(state, step_lib.device_batch(setup, batch, 1))
    assert np.isfinite(float(metrics['loss']))
    np.testing.assert_array_equal(
        jax.device_get(state['params']['groups']['blocks'][0]['mixer']['wq']['base'][...]),
        base_before)


def test_lora_accumulates_only_the_adapters_gradients():
  """Gradient accumulation with a frozen base: the same step as one large batch, and the
  micro-batch loop carries float32 accumulators for the adapters only (none the base's size)."""
  from tests.train.test_step import _one_step
  batch = random_batch(np.random.default_rng(), 16, 32)
  results = {}
  for micro in (1, 2):
    # Zero-initialised B gives A a zero first gradient and a tiny second one: the case
    # comparable_updates (which _one_step applies) is there for.
    results[micro] = _one_step(_lora_config(), batch, micro)
  (m1, m1b, p1), (m2, m2b, p2) = results[1], results[2]
  np.testing.assert_allclose(m2['loss'], m1['loss'], rtol=1e-5)
  np.testing.assert_allclose(m2['grad_norm'], m1['grad_norm'], rtol=1e-5)
  np.testing.assert_allclose(m2b['loss'], m1b['loss'], rtol=3e-5)
  for a, b in zip(p1, p2):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  config = _lora_config()
  config.train.grad_accum_steps = 2
  mesh, rules, setup = build(config, jax.devices()[:1])
  with jax.set_mesh(mesh), shd.axis_rules(rules):
    train_step = step_lib.make_train_step(setup)
    jaxpr = jax.make_jaxpr(train_step)(setup.abstract_state,
                                       step_lib.device_batch(setup, batch, 2))


  def eqns(jx):  # every equation, inside jit / pjit / scan bodies too
    for e in jx.eqns:
      yield e
      for value in e.params.values():
        for sub in (value if isinstance(value, (tuple, list)) else (value,)):
          inner = getattr(sub, 'jaxpr', sub)
          if hasattr(inner, 'eqns'):
            yield from eqns(inner)
  scans = [e for e in eqns(jaxpr.jaxpr) if e.primitive.name == 'scan' and
           e.params['length'] == 2]  # the micro-batch loop (the layer scan runs over 2 too)
  assert scans
  carried = {tuple(v.aval.shape) for e in scans
             for v in e.invars[e.params['num_consts']:e.params['num_consts'] +
                               e.params['num_carry']]}
  bases = {tuple(leaf.shape) for p, leaf in
           jax.tree_util.tree_flatten_with_path(setup.abstract_state['params'])[0]
           if "'base'" in jax.tree_util.keystr(p)}
  assert bases and not carried & bases


def test_quantized_base_places_on_a_tensor_parallel_mesh():
  """An int8 base on a 2x2x2 mesh: the values shard as the float weight does and the
  per-channel scales replicate their reduced input axis (w_down's 'mlp' is over 'tensor'), so
  the state initialises where it is meant to. (The 8-device train step itself is not run here:
  XLA's CPU runtime deadlocked in about a third of such runs, two collectives started in
  different orders on different devices; the one-device step is tested below.)"""
  config = _lora_config()
  config.compress.lora_base_dtype = 'int8'
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  mesh, rules, setup = build(config, jax.devices()[:8])
  with jax.set_mesh(mesh), shd.axis_rules(rules):
    state = setup.init(seed=1)
  ff = state['params']['groups']['blocks'][0]['ff']['w_down']['base']
  q, scale = ff['qvalue'][...], ff['scale'][...]
  assert q.dtype == jnp.int8 and q.sharding.shard_shape(q.shape)[1] == q.shape[1] // 2
  assert scale.shape[1] == 1 and scale.sharding.shard_shape(scale.shape)[1] == 1
  wq = state['params']['groups']['blocks'][0]['mixer']['wq']['base']['qvalue'][...]
  assert wq.sharding.shard_shape(wq.shape) == (2, 32, 2, 16)  # as the float base shards


@pytest.mark.parametrize('kind', ['int8', 'int4'])
def test_quantized_base_is_the_ptq_model_and_trains_only_the_adapters(kind):
  """lora_base_dtype='int8' / 'int4' (QLoRA-style): at zero adapters the model is exactly the
  post-training-quantized model; merged equals unmerged; the optimizer holds adapter moments
  only; a train step leaves the quantized values and scales as they were."""
  config = _lora_config()
  config.compress.lora_base_dtype = kind
  config.compress.int4_group_size = 16
  tokens = jnp.asarray(np.random.default_rng().integers(3, 259, (2, 16)), jnp.int32)
  model = LM(config.model, rngs=nnx.Rngs(4))
  quantized = LM(config.model, rngs=nnx.Rngs(4))
  ptq = config.copy_and_resolve_references()
  ptq.compress.method = kind
  w_lib.restructure(quantized, ptq)
  w_lib.restructure(model, config)
  adapted = [m for _, m in nnx.iter_modules(model) if isinstance(m, w_lib.LoRAWeight)]
  assert adapted and all(isinstance(m.base, w_lib.QuantizedWeight) and m.base.kind == kind
                         for m in adapted)
  np.testing.assert_array_equal(model(tokens), quantized(tokens))
  for i, weight in enumerate(adapted):
    b = weight.lora_b[...]
    weight.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(i), b.shape, b.dtype)
  unmerged = model(tokens)
  assert float(jnp.max(jnp.abs(unmerged - quantized(tokens)))) > 1e-4
  merged = w_lib.densify(model)
  assert not [m for _, m in nnx.iter_modules(merged) if isinstance(m, w_lib.CompressedWeight)]
  assert all(p[...].dtype == jnp.float32 for _, p in nnx.iter_graph(merged)
             if isinstance(p, nnx.Param) and jnp.issubdtype(p[...].dtype, jnp.floating))
  np.testing.assert_allclose(merged(tokens), unmerged, rtol=2e-4, atol=2e-4)
  if kind == 'int4':  # the train step is the same code for both kinds; one compile is enough
    return

  _, _, setup = build(config, jax.devices()[:1])
  opt = [(jax.tree_util.keystr(p), leaf) for p, leaf in
         jax.tree_util.tree_flatten_with_path(setup.abstract_state['opt_state'])[0] if leaf.ndim]
  assert opt and all('lora_a' in name or 'lora_b' in name for name, _ in opt)
  params = {jax.tree_util.keystr(p): leaf for p, leaf in
            jax.tree_util.tree_flatten_with_path(setup.abstract_state['params'])[0]}
  qvalues = [leaf for k, leaf in params.items() if "'base'" in k and 'qvalue' in k]
  assert qvalues and all(q.dtype == (jnp.int8 if kind == 'int8' else jnp.uint8) for q in qvalues)
  batch = random_batch(np.random.default_rng(), 16, 32)
  with jax.set_mesh(setup.mesh):
    state = setup.init(seed=2)
    before = _base_array(state['params']['groups']['blocks'][0]['mixer']['wq'])
    b_before = jax.device_get(state['params']['groups']['blocks'][0]['mixer']['wq']['lora_b'][...])
    state, metrics = step_lib.make_train_step(setup)(state, step_lib.device_batch(setup, batch, 1))
    assert np.isfinite(float(metrics['loss']))
    wq = state['params']['groups']['blocks'][0]['mixer']['wq']
    np.testing.assert_array_equal(_base_array(wq), before)
    # b starts at zero, so the first step's gradient reaches b (a's is zero until b moves).
    assert np.abs(b_before).max() == 0 and np.abs(jax.device_get(wq['lora_b'][...])).max() > 0


def test_quantized_bases_sharing_an_input_run_as_one_kernel_launch():
  """A QLoRA model's q/k/v and gate/up bases go through one quantized-matmul launch each (as a
  quantized model's do), each adapter's product added after: 4 launches a layer, not 7, and the
  logits of a launch per weight; gradients reach the adapters through the fused path."""
  config = _lora_config()
  config.compress.lora_base_dtype = 'int8'
  config.compress.qmm_backend, config.compress.qmm_interpret = 'triton', True
  config.model.scan_layers = False
  tokens = jnp.asarray(np.random.default_rng().integers(3, 259, (1, 4)), jnp.int32)
  model = LM(config.model, rngs=nnx.Rngs(int(np.random.default_rng().integers(1000))))
  w_lib.restructure(model, config)
  adapted = [m for _, m in nnx.iter_modules(model) if isinstance(m, w_lib.LoRAWeight)]
  for i, weight in enumerate(adapted):  # adapters away from zero, so they count in the logits
    b = weight.lora_b[...]
    weight.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(i), b.shape, b.dtype)

  def calls_and_logits():
    graphdef, state = nnx.split(model)
    fn = lambda s, t: nnx.merge(graphdef, s)(t)
    return str(jax.make_jaxpr(fn)(state, tokens)).count('pallas_call'), jax.jit(fn)(state, tokens)

  fused_calls, fused = calls_and_logits()
  for weight in adapted:
    weight.base.fuse = False
  calls, want = calls_and_logits()
  assert fused_calls == 4 * config.model.num_layers and calls == 7 * config.model.num_layers
  np.testing.assert_allclose(np.asarray(fused), np.asarray(want), rtol=1e-5,
                             atol=1e-5 * float(jnp.max(jnp.abs(want))))
  for weight in adapted:
    weight.base.fuse = True
  graphdef, lora, rest = nnx.split(model, lambda path, _: 'lora_b' in path, ...)
  grads = jax.grad(lambda l: jnp.sum(nnx.merge(graphdef, l, rest)(tokens) ** 2))(lora)
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))
