"""The training and evaluation pipeline: batch format, packing, determinism, resuming, hosts."""

import itertools
import json

import grain
import numpy as np
import pytest

import effjax.data as data
from effjax.data import pipeline
from effjax.data import sources

BATCH_KEYS = {'inputs', 'targets', 'segment_ids', 'positions', 'weights'}


def take(iterator, count: int) -> list[dict]:
  return list(itertools.islice(iterator, count))


def assert_same_batches(first: list[dict], second: list[dict]):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def document_bytes(config, split: str, process_index: int = 0, process_count: int = 1) -> list:
  documents = pipeline.host_documents(config, split, process_index, process_count)
  return [documents[i]['text'].encode('utf-8') for i in range(len(documents))]


def segments(batch: dict):
  """Yields (row, segment id, inputs, targets) for every packed segment."""
  for row in range(batch['inputs'].shape[0]):
    for segment in np.unique(batch['segment_ids'][row]):
      if segment:
        where = batch['segment_ids'][row] == segment
        yield row, segment, batch['inputs'][row][where], batch['targets'][row][where]


def assert_well_packed(batch: dict, rows: int, seq_len: int, documents: list[bytes]):
  """Documents never cross inside a row, and every segment is a piece of a real document."""
  assert set(batch) == BATCH_KEYS
  for key in BATCH_KEYS:
    assert batch[key].shape == (rows, seq_len), key
  for key in ('inputs', 'targets', 'segment_ids', 'positions'):
    assert batch[key].dtype == np.int32, key
  assert batch['weights'].dtype == np.float32
  segment_ids, positions = batch['segment_ids'], batch['positions']
  padding = segment_ids == 0
  assert np.all(batch['weights'][padding] == 0) and np.all(batch['weights'][~padding] == 1)
  assert np.all(batch['inputs'][padding] == 0) and np.all(batch['targets'][padding] == 0)
  assert np.all(positions[padding] == 0)
  for row in range(rows):
    ids, pos = segment_ids[row], positions[row]
    real = ids[ids > 0]
    # Segments are 1, 2, 3 ... in order, each contiguous, and padding only at the end.
    assert np.array_equal(np.unique(real), np.arange(1, len(np.unique(real)) + 1))
    assert np.all(np.diff(real) >= 0) and np.all(ids[len(real):] == 0)
    # Positions restart exactly where the segment changes and count up inside it.
    starts = np.flatnonzero(np.diff(ids[:len(real)], prepend=-1) != 0)
    assert np.all(pos[starts] == 0)
    inside = np.setdiff1d(np.arange(len(real)), starts)
    assert np.all(pos[inside] == pos[inside - 1] + 1)
  for _, _, inputs, targets in segments(batch):
    np.testing.assert_array_equal(targets[:-1], inputs[1:])  # next-token targets within a segment
    tokens = np.concatenate([inputs, targets[-1:]])
    # bos only opens and eos only closes a document.
    assert not np.any(tokens[1:] == 1) and not np.any(tokens[:-1] == 2)
    text = bytes((tokens[(tokens >= 3)] - 3).astype(np.uint8).tolist())
    assert any(text in document for document in documents), text[:80]
    if tokens[0] == 1 and tokens[-1] == 2:
      assert any(text == document for document in documents)  # a whole document


def test_batch_format_and_packing_invariants(make_config, fresh_seed):
  config = make_config(seq_len=48, shuffle_seed=fresh_seed % 1000, max_documents=30)
  documents = document_bytes(config, 'train')
  iterator = data.make_train_iterator(config)
  for batch in take(iterator, 30):
    assert_well_packed(batch, rows=8, seq_len=48, documents=documents)
    assert batch['weights'].mean() > 0.5


def test_same_seed_same_batches_different_seed_different(make_config, fresh_seed):
  config = make_config(shuffle_seed=fresh_seed % 2**31)
  first = take(data.make_train_iterator(config), 5)
  assert_same_batches(first, take(data.make_train_iterator(config), 5))
  other = take(data.make_train_iterator(make_config(shuffle_seed=fresh_seed % 2**31 + 1)), 5)
  assert any(not np.array_equal(a['inputs'], b['inputs']) for a, b in zip(first, other))


def test_shuffle_seed_minus_one_uses_the_global_seed(make_config, fresh_seed):
  seed = fresh_seed % 1000
  by_global = take(data.make_train_iterator(make_config(seed=seed, shuffle_seed=-1)), 3)
  by_data = take(data.make_train_iterator(make_config(seed=123456, shuffle_seed=seed)), 3)
  assert_same_batches(by_global, by_data)


def test_resume_from_state_reproduces_the_continuation(make_config, fresh_seed):
  rng = np.random.default_rng(fresh_seed)
  # Few, short documents so that k batches cross chunk-window and epoch boundaries.
  config = make_config(seq_len=32, max_documents=12, shuffle_seed=int(rng.integers(1000)))
  skipped = int(rng.integers(0, 300))
  iterator = data.make_train_iterator(config)
  take(iterator, skipped)
  state = iterator.get_state()
  expected = take(iterator, 20)

  restored = data.make_train_iterator(config)
  restored.set_state(json.loads(json.dumps(state)))  # the state survives JSON (orbax writes JSON)
  assert_same_batches(expected, take(restored, 20))
  # State taken mid-way after a restore resumes as well.
  restored.set_state(state)
  take(restored, 7)
  again = data.make_train_iterator(config)
  again.set_state(restored.get_state())
  assert_same_batches(expected[7:], take(again, 13))


def test_checkpoint_with_orbax(make_config, tmp_path, fresh_seed):
  ocp = pytest.importorskip('orbax.checkpoint')
  config = make_config(shuffle_seed=fresh_seed % 1000)
  iterator = data.make_train_iterator(config)
  take(iterator, 11)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.save(11, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = take(iterator, 5)
    restored = data.make_train_iterator(config)
    manager.restore(11, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert_same_batches(expected, take(restored, 5))


def test_training_repeats_forever(make_config):
  config = make_config(max_documents=2, seq_len=32)
  total_tokens = sum(len(d) + 2 for d in document_bytes(config, 'train'))
  iterator = data.make_train_iterator(config)
  real_tokens = 0
  batches = 0
  while real_tokens < 3 * total_tokens:  # three epochs and more
    real_tokens += int(next(iterator)['weights'].sum())
    batches += 1
  assert batches > 2


def test_hosts_read_disjoint_documents_and_half_the_rows(make_config, fresh_seed):
  config = make_config(shuffle_seed=fresh_seed % 1000, max_documents=40)
  all_ids = set(d['id'] for d in pipeline.host_documents(config, 'train', 0, 1))
  host_ids = [set(d['id'] for d in pipeline.host_documents(config, 'train', p, 2)) for p in (0, 1)]
  assert not host_ids[0] & host_ids[1]
  assert host_ids[0] | host_ids[1] == all_ids
  for host in (0, 1):
    mine = document_bytes(config, 'train', host, 2)
    for batch in take(data.make_train_iterator(config, process_index=host, process_count=2), 8):
      assert_well_packed(batch, rows=4, seq_len=64, documents=mine)
  with pytest.raises(ValueError, match='batch_size'):
    data.make_train_iterator(make_config(batch_size=6), process_index=0, process_count=4)


def test_eval_batches_are_fixed_validation_only_and_padded(make_config):
  config = make_config(max_documents=3, seq_len=64, batch_size=8)
  batches = data.make_eval_batches(config, 1000)
  assert 0 < len(batches) < 1000  # fewer: the split is smaller
  assert data.make_eval_batches(config, 1000) is batches  # cached
  validation = document_bytes(config, 'validation')
  for batch in batches:
    assert_well_packed(batch, rows=8, seq_len=64, documents=validation)
  # Only the last batch may hold empty rows (weights 0), and only after its real rows.
  real_rows = [batch['weights'].sum(axis=1) > 0 for batch in batches]
  assert all(rows.all() for rows in real_rows[:-1])
  assert real_rows[-1].any() and np.all(np.diff(real_rows[-1].astype(int)) <= 0)
  # Every validation token is evaluated exactly once.
  tokens = sum(int(b['weights'].sum()) for b in batches)
  assert tokens == sum(len(d) + 1 for d in validation)
  # The same batches when rebuilt from scratch.
  pipeline._eval_batches_cache.clear()
  assert_same_batches(batches, data.make_eval_batches(config, 1000))
  assert len(data.make_eval_batches(config, 2)) == 2


def test_eval_batches_per_host_are_disjoint_and_equal_in_number(make_config):
  config = make_config(max_documents=5, batch_size=8)
  hosts = [data.make_eval_batches(config, 1000, process_index=p, process_count=2) for p in (0, 1)]
  assert len(hosts[0]) == len(hosts[1]) > 0
  for host, batches in enumerate(hosts):
    mine = document_bytes(config, 'validation', host, 2)
    for batch in batches:
      assert_well_packed(batch, rows=4, seq_len=64, documents=mine)
  tokens = sum(int(b['weights'].sum()) for batches in hosts for b in batches)
  assert tokens == sum(len(d) + 1 for d in document_bytes(config, 'validation'))


def test_sentencepiece_pipeline(make_config):
  config = make_config(tokenizer='sentencepiece', sentencepiece_vocab_size=384, max_documents=30)
  tokenizer = data.make_tokenizer(config)
  batch = next(data.make_train_iterator(config))
  assert set(batch) == BATCH_KEYS and batch['inputs'].shape == (8, 64)
  assert batch['inputs'].max() < tokenizer.vocab_size
  train_texts = [d.decode('utf-8') for d in document_bytes(config, 'train')]
  for _, _, inputs, _ in segments(batch):
    text = tokenizer.decode(inputs)
    if text and '\ufffd' not in text:  # a cut through a byte-fallback character decodes to U+FFFD
      assert any(text in document for document in train_texts)


def test_text_files_pipeline(make_config, tmp_path, fresh_seed):
  rng = np.random.default_rng(fresh_seed)
  for i in range(20):
    (tmp_path / f'{i}.txt').write_text(' '.join(rng.choice(['a', 'bb', 'ccc'], size=50)) + f' {i}')
  config = make_config(source='text_files', glob=str(tmp_path / '*.txt'), validation_percent=10)
  documents = document_bytes(config, 'train')
  for batch in take(data.make_train_iterator(config), 5):
    assert_well_packed(batch, rows=8, seq_len=64, documents=documents)
  assert data.data_dir(config) == config.data.data_dir
  assert sources.data_dir(config) == config.data.data_dir
