"""Tests for effjax.train.checkpoint on 8 forced CPU devices.

Each test draws a fresh seed (printed, so a failure can be replayed) and builds its state from a
real flax.nnx module and a real optax.adamw state, because the tree shapes those libraries produce
(boxed Variables, namedtuples, EmptyState) are what the wrapper has to get right.
"""

import hashlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from effjax.train.checkpoint import CheckpointError, Checkpointer

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def seed():
  value = int(np.random.SeedSequence().entropy % (2**31))
  print(f'seed={value}')
  return value


class _Net(nnx.Module):
  """Small but varied: dense kernels, a norm, a list of blocks (integer keys), a head."""

  def __init__(self, width: int, rngs: nnx.Rngs, extra: bool = False):
    self.embed = nnx.Linear(16, width, rngs=rngs)
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(2)])
    self.head = nnx.Linear(width, 8, rngs=rngs)
    if extra:
      self.extra = nnx.Linear(width, width, rngs=rngs)


def _abstract_train_state(width: int = 32, extra: bool = False):
  """The trainer's state tree, shapes only: nnx.State of Params and adamw's optax state."""
  params = nnx.state(nnx.eval_shape(lambda: _Net(width, nnx.Rngs(0), extra=extra)), nnx.Param)
  opt_state = jax.eval_shape(optax.adamw(1e-3).init, params)
  return {'params': params, 'opt_state': opt_state, 'step': jax.ShapeDtypeStruct((), jnp.int32)}


def _train_state(seed: int, width: int = 32, extra: bool = False):
  """The same tree with random numpy values (host-side: no per-op compiles on 8 CPU devices)."""
  rng = np.random.default_rng(seed)

  def fill(x):
    if jnp.issubdtype(x.dtype, jnp.integer):
      return rng.integers(0, 1000, x.shape, dtype=x.dtype)
    return rng.standard_normal(x.shape).astype(x.dtype)

  return jax.tree.map(fill, _abstract_train_state(width, extra))


def _mesh(shape, names):
  return Mesh(np.asarray(jax.devices()).reshape(shape), names)


def _data_parallel_sharding(mesh):
  """8x1 data parallel: parameters replicated, optimizer moments split over 'data' (ZeRO-1)."""

  def sharding(path, x):
    in_opt_state = path[0] == jax.tree_util.DictKey('opt_state')
    if in_opt_state and x.ndim == 2 and x.shape[0] % mesh.shape['data'] == 0:
      return NamedSharding(mesh, P('data', None))
    return NamedSharding(mesh, P())

  return sharding


def _fsdp_tensor_sharding(mesh):
  """2x2x2 ('data', 'fsdp', 'tensor'): kernels over fsdp x tensor, vectors over tensor."""

  def sharding(path, x):
    del path
    if x.ndim == 2:
      return NamedSharding(mesh, P('fsdp', 'tensor'))
    if x.ndim == 1 and x.shape[0] % mesh.shape['tensor'] == 0:
      return NamedSharding(mesh, P('tensor'))
    return NamedSharding(mesh, P())

  return sharding


def _place(state, sharding):
  return jax.tree_util.tree_map_with_path(lambda p, x: jax.device_put(x, sharding(p, x)), state)


def _abstract(state, sharding):
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding(p, x)), state)


def _one_device():
  """For tests about steps and files: a single-device mesh keeps orbax's per-device work small."""
  mesh = Mesh(np.asarray(jax.devices()[:1]), ('data',))
  return lambda path, x: NamedSharding(mesh, P())


def _assert_same_values(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _snapshot(directory):
  """Every directory and file under `directory`, files with their sha256."""
  listing = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs:
      listing[os.path.relpath(os.path.join(root, name), directory) + '/'] = None
    for name in files:
      path = os.path.join(root, name)
      listing[os.path.relpath(path, directory)] = hashlib.sha256(
          pathlib.Path(path).read_bytes()).hexdigest()
  return listing


def test_restores_onto_another_mesh_with_other_shardings(tmp_path, seed):
  state = _train_state(seed)
  state['rng'] = jax.random.key(seed)  # typed PRNG keys are stored as their uint32 key data
  saved_on = _data_parallel_sharding(_mesh((8, 1), ('data', 'tensor')))
  with Checkpointer(tmp_path / 'ckpt', save_every=1, async_save=True) as ckpt:
    assert ckpt.save(7, _place(state, saved_on), metadata={'config': {'width': 32}})

  restore_on = _fsdp_tensor_sharding(_mesh((2, 2, 2), ('data', 'fsdp', 'tensor')))
  abstract = _abstract(state, restore_on)
  with Checkpointer(tmp_path / 'ckpt', save_every=1) as ckpt:
    restored = ckpt.restore(7, abstract)
    assert ckpt.metadata(7) == {'config': {'width': 32}}

  assert jax.tree.structure(restored) == jax.tree.structure(abstract)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
    assert got.sharding == want.sharding  # placed directly where asked, not where saved
  assert restored['params']['embed']['kernel'][...].sharding.spec == P('fsdp', 'tensor')
  assert isinstance(restored['params'], nnx.State)
  assert isinstance(restored['params']['embed']['kernel'], nnx.Param)
  assert isinstance(restored['opt_state'][0], optax.ScaleByAdamState)
  np.testing.assert_array_equal(jax.random.key_data(restored.pop('rng')),
                                jax.random.key_data(state.pop('rng')))
  _assert_same_values(restored, state)


def test_save_every_and_keep_last_n(tmp_path, seed):
  state = _place({'w': np.random.default_rng(seed).standard_normal((8, 4))}, _one_device())
  directory = tmp_path / 'ckpt'
  with Checkpointer(directory, save_every=3, keep=2, async_save=True) as ckpt:
    saved = [step for step in range(1, 12) if ckpt.save(step, state)]
    assert saved == [3, 6, 9]  # not step 1: orbax's save-the-first-step default is off
    assert ckpt.save(11, state, force=True)
    assert not ckpt.save(11, state, force=True)  # an existing step is never overwritten
    assert not ckpt.save(13, state)  # off the save_every grid
    ckpt.wait()
    assert ckpt.all_steps() == [9, 11]
  assert sorted(p.name for p in directory.iterdir() if p.name[0].isdigit()) == ['11', '9']


def test_new_checkpointer_resumes_from_latest_step(tmp_path, seed):
  directory = tmp_path / 'ckpt'
  sharding = _one_device()
  states = {s: _place(_train_state(seed + s), sharding) for s in (2, 4, 6)}
  config = ml_collections.ConfigDict({'model': {'width': 32}, 'lr': 1e-3, 'mesh': (8, 1)})

  with Checkpointer(directory, save_every=2, keep=3) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(2, states[2], metadata={'config': config, 'seed': seed})
    assert ckpt.save(4, states[4])

  with Checkpointer(directory, save_every=2, keep=3) as ckpt:
    assert ckpt.latest_step() == 4
    assert ckpt.all_steps() == [2, 4]
    _assert_same_values(ckpt.restore(None, _abstract(states[4], sharding)), states[4])
    assert ckpt.metadata(2) == {
        'config': {'model': {'width': 32}, 'lr': 1e-3, 'mesh': [8, 1]}, 'seed': seed}
    assert ckpt.metadata(4) is None
    assert not ckpt.save(4, states[6])
    assert ckpt.save(6, states[6])

  with Checkpointer(directory, save_every=2, keep=3) as ckpt:
    assert ckpt.latest_step() == 6
    _assert_same_values(ckpt.restore(2, _abstract(states[2], sharding)), states[2])
    with pytest.raises(FileNotFoundError, match='step 5'):
      ckpt.restore(5, _abstract(states[2], sharding))


def test_data_iterator_state_round_trip(tmp_path, seed):
  rng = np.random.default_rng(seed)
  dataset = grain.MapDataset.range(100).shuffle(seed=1).to_iter_dataset()
  state = _place(_train_state(seed), _one_device())
  abstract = _abstract(state, _one_device())
  take = lambda it, n: [int(next(it)) for _ in range(n)]

  iterator = iter(dataset)
  take(iterator, int(rng.integers(1, 40)))
  with Checkpointer(tmp_path / 'ckpt', save_every=1, async_save=True) as ckpt:
    assert ckpt.save(1, state, data_iterator=iterator)
    continuation = take(iterator, 10)  # advancing right away: the saved state is already captured
    take(iterator, int(rng.integers(1, 40)))
    assert ckpt.save(2, state)  # a step saved without iterator state

    ckpt.restore(1, abstract, data_iterator=iterator)
    assert take(iterator, 10) == continuation
    fresh = iter(dataset)  # as after a restart
    ckpt.restore(1, abstract, data_iterator=fresh)
    assert take(fresh, 10) == continuation

    untouched = iter(dataset)
    _assert_same_values(ckpt.restore(2, abstract, data_iterator=untouched), state)
    assert take(untouched, 10) == take(iter(dataset), 10)
    _assert_same_values(ckpt.restore(1, abstract), state)  # iterator item present, not asked for


def test_mismatch_names_parameter_and_leaves_disk_untouched(tmp_path, seed):
  directory = tmp_path / 'ckpt'
  sharding = _one_device()
  state = _place(_train_state(seed, width=32), sharding)
  it = iter(grain.MapDataset.range(100).shuffle(seed=1).to_iter_dataset())
  next(it)
  with Checkpointer(directory, save_every=5, keep=1) as ckpt:
    assert ckpt.save(5, state, data_iterator=it, metadata={'width': 32})
  before = _snapshot(directory)

  with Checkpointer(directory, save_every=5, keep=1) as ckpt:
    wider = _abstract(_abstract_train_state(width=48), sharding)
    with pytest.raises(CheckpointError) as error:
      ckpt.restore(5, wider, data_iterator=it)
    message = str(error.value)
    assert ('params/embed/kernel: saved with shape (16, 32) float32, '
            'expected shape (16, 48) float32') in message
    assert message.index('params/embed/kernel') < message.index('opt_state/0/mu/embed/kernel')
    assert message.endswith('... and 7 more')  # 27 leaves differ, 20 are named
    assert 'nothing on disk was changed' in message

    with pytest.raises(CheckpointError, match=r'params/extra/kernel: expected .* missing'):
      ckpt.restore(5, _abstract(_abstract_train_state(extra=True), sharding))
    with pytest.raises(CheckpointError, match=r'opt_state/0/count: in the checkpoint .* not in'):
      ckpt.restore(5, {'params': _abstract(state['params'], sharding),
                       'step': _abstract(state['step'], sharding)})
    as_bf16 = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=x.sharding), wider)
    with pytest.raises(CheckpointError, match=r'params/head/bias: saved with shape \(8,\) float32, '
                       r'expected shape \(8,\) bfloat16'):
      ckpt.restore(5, as_bf16)
    with pytest.raises(ValueError, match='sharding'):
      ckpt.restore(5, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
    _assert_same_values(ckpt.restore(5, _abstract(state, sharding)), state)  # still intact
  assert _snapshot(directory) == before


def test_unfinalized_step_directory_is_ignored(tmp_path, seed):
  """Orbax writes `<step>.orbax-checkpoint-tmp*` and renames it only when every host is done."""
  directory = tmp_path / 'ckpt'
  sharding = _one_device()
  state = _place(_train_state(seed), sharding)
  with Checkpointer(directory, save_every=2) as ckpt:
    assert ckpt.save(2, state)
  # Two half-written steps that look complete inside, in both temporary-name spellings.
  shutil.copytree(directory / '2', directory / '4.orbax-checkpoint-tmp')
  shutil.copytree(directory / '2', directory / '6.orbax-checkpoint-tmp-1700000000')

  with Checkpointer(directory, save_every=2) as ckpt:
    assert ckpt.latest_step() == 2
    assert ckpt.all_steps() == [2]
    _assert_same_values(ckpt.restore(None, _abstract(state, sharding)), state)
    with pytest.raises(FileNotFoundError):
      ckpt.restore(4, _abstract(state, sharding))
  assert (directory / '4.orbax-checkpoint-tmp').is_dir()  # left alone, not deleted


_KILLED_MID_SAVE = """
import glob, os, signal, sys
import jax, numpy as np
from effjax.train.checkpoint import Checkpointer

directory, seed = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(seed)
ckpt = Checkpointer(directory, save_every=1, async_save=True)
ckpt.save(1, {'w': jax.numpy.asarray(rng.standard_normal(1000, dtype=np.float32))})
ckpt.wait()
big = {'w': jax.numpy.asarray(rng.standard_normal(8_000_000, dtype=np.float32))}
ckpt.save(2, big)  # returns with the write still running in the background
if glob.glob(os.path.join(directory, '2.orbax-checkpoint-tmp*')):
  print('killing mid-save', flush=True)
  os.kill(os.getpid(), signal.SIGKILL)
print('no temporary directory to kill in', flush=True)
"""


def test_process_killed_during_async_save_leaves_previous_step_latest(tmp_path, seed):
  directory = tmp_path / 'ckpt'
  script = tmp_path / 'killed_mid_save.py'
  script.write_text(textwrap.dedent(_KILLED_MID_SAVE))
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get('PYTHONPATH', '')]))
  result = subprocess.run([sys.executable, str(script), str(directory), str(seed)], env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr[-3000:]
  assert 'killing mid-save' in result.stdout
  assert list(directory.glob('2.orbax-checkpoint-tmp*'))  # the half-written step is on disk

  rng = np.random.default_rng(seed)
  step_1 = rng.standard_normal(1000, dtype=np.float32)
  abstract = {'w': jax.ShapeDtypeStruct((1000,), jnp.float32,
                                        sharding=NamedSharding(_mesh((8,), ('data',)), P()))}
  with Checkpointer(directory, save_every=1) as ckpt:
    assert ckpt.latest_step() == 1
    assert ckpt.all_steps() == [1]
    np.testing.assert_array_equal(np.asarray(ckpt.restore(None, abstract)['w']), step_1)
    # The resumed run writes step 2 again over orbax's leftover temporary directory.
    new_step_2 = {'w': jnp.asarray(rng.standard_normal(1000, dtype=np.float32))}
    assert ckpt.save(2, new_step_2)
    ckpt.wait()
    assert ckpt.latest_step() == 2
    _assert_same_values(ckpt.restore(2, abstract), new_step_2)


def test_relative_directory_saves_and_restores(tmp_path, seed, monkeypatch):
  # orbax rejects a relative local path only when it first writes; the wrapper resolves it.
  monkeypatch.chdir(tmp_path)
  state = _place({'w': np.random.default_rng(seed).standard_normal((8, 4))}, _one_device())
  with Checkpointer('runs/ckpt', save_every=1) as ckpt:
    assert ckpt.save(1, state)
  with Checkpointer('runs/ckpt') as ckpt:
    assert ckpt.latest_step() == 1
    _assert_same_values(ckpt.restore(None, _abstract(state, _one_device())), state)
  assert (tmp_path / 'runs' / 'ckpt' / '1').is_dir()
