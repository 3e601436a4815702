"""Training checkpoints: a thin wrapper over `orbax.checkpoint.CheckpointManager`.

Orbax does the real work: asynchronous saves, keep-the-last-N, multi-host coordination and
atomic commits. The wrapper exists for four things orbax leaves to its caller:

- The trainer's state mixes `nnx.State` trees of boxed `nnx.Variable`s with optax namedtuples.
  The boxes are taken off before saving, so the checkpoint holds plain arrays under readable
  paths (`params/l1/kernel`, `opt_state/0/mu/l1/kernel`) that do not depend on how a flax
  version flattens a Variable; on restore the caller's own structure (Variable types and their
  metadata, namedtuples) is rebuilt from its abstract state.
- A checkpoint that does not fit the model must fail before a single array is read, with one
  message naming the parameter, the saved and the expected shape (`CheckpointError`).
- The grain iterator state and a small JSON record (config, run facts) are items of the same step,
  so they are committed together with the arrays or not at all.
- Saves happen only at `step % save_every == 0` (or when forced); orbax by default also saves the
  first step it sees, which would leave an off-interval checkpoint behind on every restart.

What orbax guarantees, and this module relies on rather than re-implements:

- Atomic steps. A step is written under `<step>.orbax-checkpoint-tmp*` and renamed to `<step>`
  only after every process has finished writing (POSIX file systems); on object stores without an
  atomic rename (GCS) a `commit_success.txt` is written last instead. Step discovery (`latest_step`,
  `all_steps`, `restore(None, ...)`) skips whatever is not finalized, so a process that died in the
  middle of a save leaves a temporary directory that is never taken as a checkpoint. Temporary
  directories are left in place (`cleanup_tmp_directories` stays off): nothing is deleted behind the
  user's back.
- Asynchronous saves. `save` returns once the arrays are copied off the accelerator, so the train
  step may donate its buffers right away; the write and the commit run on a background thread and a
  later `save`, `wait` or `close` waits for them. Old steps are deleted only after a newer one is
  committed.
- Multi-host. Every process calls `save`/`restore`; each writes the shards it owns and orbax
  synchronises the processes and finalizes on the primary one. Nothing here writes array data from
  one host only. The grain item holds one JSON file per process, so a data-iterator state restores
  only under the same process count.
- Preemption. On a jax.distributed run with preemption notices, orbax also saves at the step all
  processes agree on after the notice, off the `save_every` grid.

Layout of one step: `<directory>/<step>/{state, data_iter, metadata}`.
"""

from __future__ import annotations

from collections.abc import Mapping
import os
from typing import Any

import grain.checkpoint as grain_checkpoint
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

_STATE = 'state'
_DATA_ITER = 'data_iter'
_METADATA = 'metadata'
_MAX_LISTED = 20  # mismatches named in one error; more are counted, not listed


_REPLICAS_WHOLE = False  # whether _write_replicas_whole registered its handler in this process


def _write_replicas_whole() -> None:
  """In a single-process run, every replica of an array is saved whole by one writer.

  orbax's default on CPU (and on GPU unless JAX_PLATFORMS names it) is replica-parallel saving:
  each replica of a replicated array writes a slice of it, cut with eager jax slices that are
  compiled per shape on the first save. With one process every slice is written by the same
  process anyway, so this gains nothing; in a CPU profile (the test suite's shrunk
  configs/gpt2_small.py, 8 devices) the slices took 1.7 s of a 3.6 s first save. orbax's array handler is registered process-wide, so this sets it for the
  process; runs of several processes keep orbax's default, where the slices spread the writing
  over hosts. Either way the checkpoint restores the same.
  """
  global _REPLICAS_WHOLE
  if _REPLICAS_WHOLE or jax.process_count() > 1:
    return
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # orbax warns on any override of a registered type
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
  finally:
    logging.set_verbosity(verbosity)
  _REPLICAS_WHOLE = True


class CheckpointError(ValueError):
  """A checkpoint exists but does not fit the state it should be restored into."""


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _unbox(tree: Any) -> Any:
  """Replaces every nnx.Variable by its raw value so orbax sees only containers and arrays."""
  return jax.tree.map(lambda x: x.get_value() if _is_variable(x) else x, tree, is_leaf=_is_variable)


def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path_name(path: tuple[Any, ...]) -> str:
  return '/'.join(_key_name(k) for k in path) or '<root>'


def _leaves_by_name(tree: Any) -> dict[str, Any]:
  """Leaves keyed by path name, in flattening order.

  Names, not positions, pair saved and expected leaves: orbax stores a namedtuple as a dict and a
  tuple as a list, and the names (`opt_state/0/mu/...`) are the same either way.
  """
  leaves = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = _path_name(path)
    if name in leaves:
      raise ValueError(f'two leaves of the state share the path name {name!r}')
    leaves[name] = leaf
  return leaves


def _stored_shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype | None]:
  """Shape and dtype as orbax stores them: a typed PRNG key is stored as its uint32 key data."""
  dtype = getattr(leaf, 'dtype', None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    leaf = jax.eval_shape(jax.random.key_data, leaf)
    dtype = leaf.dtype
  shape = getattr(leaf, 'shape', None)
  return tuple(shape) if shape is not None else (), np.dtype(dtype) if dtype is not None else None


def _describe(shape: tuple[int, ...], dtype: np.dtype) -> str:
  return f'shape {shape} {dtype}'


def _check_compatible(saved_tree: Any, target: Any, where: str) -> None:
  """Raises CheckpointError unless every saved leaf matches `target` by path, shape and dtype."""
  saved = {name: _stored_shape_dtype(meta) for name, meta in _leaves_by_name(saved_tree).items()}
  expected = {name: _stored_shape_dtype(leaf) for name, leaf in _leaves_by_name(target).items()}
  problems = []
  # Shallow paths first: a parameter is listed before the optimizer moments that mirror it.
  for name in sorted(saved.keys() | expected.keys(), key=lambda n: (n.count('/'), n)):
    if name not in expected:
      problems.append(f'{name}: in the checkpoint ({_describe(*saved[name])}) but not in the state '
                      'to restore into')
    elif name not in saved:
      problems.append(f'{name}: expected ({_describe(*expected[name])}) but missing from the '
                      'checkpoint')
    elif saved[name] != expected[name]:
      problems.append(f'{name}: saved with {_describe(*saved[name])}, expected '
                      f'{_describe(*expected[name])}')
  if problems:
    listed = problems[:_MAX_LISTED]
    if len(problems) > _MAX_LISTED:
      listed.append(f'... and {len(problems) - _MAX_LISTED} more')
    raise CheckpointError(
        f'{where} does not fit the state to restore into ({len(problems)} mismatches); '
        'nothing was loaded and nothing on disk was changed:\n  '
        + '\n  '.join(listed))


def _restore_target(abstract_state: Any) -> Any:
  """Unboxed abstract state whose leaves all carry the sharding to restore onto."""

  def target(path, leaf):
    sharding = getattr(leaf, 'sharding', None)
    if sharding is None or not hasattr(leaf, 'shape'):
      raise ValueError(
          f'abstract_state leaf {_path_name(path)} must be a jax.ShapeDtypeStruct (or array) '
          f'with a sharding, so that it is restored directly in place; got {leaf!r}')
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

  return jax.tree_util.tree_map_with_path(target, _unbox(abstract_state))


def _jsonable(value: Any) -> Any:
  """Turns configs, tuples and numpy/jax scalars into JSON types before anything is written.

  Converting up front means an unserialisable value fails in `save` before orbax creates a
  directory, instead of leaving a half-written step behind.
  """
  if hasattr(value, 'to_dict'):  # ml_collections.ConfigDict and friends
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, (np.ndarray, np.generic)) or (
      isinstance(value, jax.Array) and value.is_fully_addressable):
    return np.asarray(value).tolist()
  return str(value)


class Checkpointer:
  """Saves and restores the training state, the data-iterator state and run metadata by step.

  Call every method on every process of a multi-host run: orbax synchronises them.
  """

  def __init__(self, directory: epath.PathLike, *, save_every: int = 1, keep: int | None = 3,
               async_save: bool = True):
    if save_every < 1:
      raise ValueError(f'save_every must be a positive number of steps, got {save_every}')
    if keep is not None and keep < 1:
      raise ValueError(f'keep must be a positive number of checkpoints or None (all), got {keep}')
    # orbax refuses a relative local path at its first save (after a whole run has trained), so
    # a relative workdir is resolved against the current directory here; URIs (gs://) pass as is.
    if '://' not in os.fspath(directory):
      directory = os.path.abspath(os.fspath(directory))
    self.directory = epath.Path(directory)
    self.save_every = save_every
    _write_replicas_whole()
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        # Replaces orbax's default policy, whose InitialSavePolicy would save any first step.
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(save_every),
            policies.PreemptionCheckpointingPolicy(),
        ]),
    )
    # Handlers are named up front so that a fresh process can read a step's metadata (and check
    # it against the model) before it has saved or restored anything itself.
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={
            _STATE: ocp.StandardCheckpointHandler(),
            _DATA_ITER: grain_checkpoint.CheckpointHandler(),
            _METADATA: ocp.JsonCheckpointHandler(),
        },
        options=options,
    )

  def latest_step(self) -> int | None:
    """The newest step, or None when the directory holds no checkpoint.

    On disk only finalized steps count; a step this object is still writing asynchronously is
    included (as orbax does), and `restore` waits for it.
    """
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps, oldest first, counted as in `latest_step`."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, *, data_iterator: Any = None,
           metadata: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Saves `state` at `step` when `step % save_every == 0` or `force`; returns whether it did.

    Meant to be called at every step: skipping is cheap, and orbax's preemption save can only
    happen at a step it is shown. `state` is a pytree of (sharded) jax.Arrays, nnx.State and optax
    states included. An existing step is never overwritten: saving it again returns False. With
    async saves this returns once the arrays are on the host, so the caller may donate them next;
    the iterator state and `metadata` are captured before it returns.
    """
    step = int(step)
    if step in self._manager.all_steps():
      if force:
        logging.info('checkpoint for step %d already exists in %s; not saving it again', step,
                     self.directory)
      return False
    if not force and not self._manager.should_save(step):
      return False
    items = {_STATE: ocp.args.StandardSave(_unbox(state))}
    if data_iterator is not None:
      items[_DATA_ITER] = grain_checkpoint.CheckpointSave(data_iterator)
    if metadata is not None:
      items[_METADATA] = ocp.args.JsonSave(_jsonable(metadata))
    # Decided above, so force=True keeps orbax from asking should_save (and the preemption
    # check behind it) a second time for this step.
    return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def reached_preemption(self, step: int) -> bool:
    """Multi-process runs: whether every process has reached the step agreed for a preemption save.

    JAX's coordination service turns a SIGTERM on any host into one agreed step; all processes
    must call this at every step. Single-process runs return False (the trainer's own signal
    handler covers them).
    """
    return bool(self._manager.reached_preemption(int(step)))

  def restore(self, step: int | None, abstract_state: Any, *, data_iterator: Any = None) -> Any:
    """Restores the state of `step` (None: the latest) onto the shardings of `abstract_state`.

    `abstract_state` is the state's pytree with jax.ShapeDtypeStruct leaves carrying a sharding
    (e.g. NamedSharding on the current mesh); arrays are read straight into those shardings, so a
    checkpoint written on one mesh restores onto another. The saved tree metadata is compared
    with `abstract_state` first: any path, shape or dtype difference raises CheckpointError
    before an array is read. If `data_iterator` is given, its state is set in place from the
    checkpoint; a checkpoint saved without one leaves the iterator as it is (with a warning).
    """
    self._manager.wait_until_finished()  # a step still being written cannot be read yet
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f'no finalized checkpoint in {self.directory}')
    step = int(step)
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f'no finalized checkpoint for step {step} in {self.directory}; '
                              f'finalized steps: {self.all_steps()}')
    target = _restore_target(abstract_state)
    where = f'checkpoint step {step} in {self.directory}'
    saved = self._manager.metadata(step).item_metadata  # tree metadata only, no array data
    if saved is None or _STATE not in saved or saved[_STATE] is None:
      raise CheckpointError(f'{where} holds no array state; nothing on disk was changed')
    saved_tree = saved[_STATE]
    _check_compatible(getattr(saved_tree, 'tree', saved_tree), target, where)

    items = {_STATE: ocp.args.StandardRestore(target)}
    if data_iterator is not None:
      if (self._step_directory(step) / _DATA_ITER).exists():
        items[_DATA_ITER] = grain_checkpoint.CheckpointRestore(data_iterator)
      else:
        logging.warning('%s has no data-iterator state; the iterator keeps its current position',
                        where)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))

    # Put the arrays back into the caller's structure: its treedef carries the Variable types with
    # their metadata and the optax namedtuples. Unboxing replaced each Variable by its one array,
    # so the target's leaves are the caller's leaves in the same order.
    arrays = _leaves_by_name(restored[_STATE])
    treedef = jax.tree.structure(abstract_state)
    leaves = [arrays[name] for name in _leaves_by_name(target)]
    assert len(leaves) == treedef.num_leaves, (len(leaves), treedef.num_leaves)
    return jax.tree.unflatten(treedef, leaves)

  def metadata(self, step: int) -> dict[str, Any] | None:
    """The JSON metadata saved with `step`, or None if that step was saved without any."""
    self._manager.wait_until_finished()
    if not (self._step_directory(step) / _METADATA).exists():
      return None
    restored = self._manager.restore(
        int(step), args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()}))
    return restored[_METADATA]

  def wait(self) -> None:
    """Blocks until the asynchronous save in flight, if any, is committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's threads."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _step_directory(self, step: int) -> epath.Path:
    # Steps are named by the bare number (no prefix, no padding): orbax's default name format.
    return self.directory / str(int(step))
