"""The grain pipeline: documents -> tokens -> chunks -> packed rows -> per-host batches.

Train order, for host p of P:

  documents of the train split, capped at data.max_documents, every P-th from p
  -> shuffled by the seed, afresh each epoch, repeated forever            (MapDataset, lazy)
  -> tokenized as [bos] + tokens + [eos]                                    (per document, lazy)
  -> cut into chunks of seq_len + 1 tokens overlapping by one, each chunk
     {'inputs': t[:-1], 'targets': t[1:]}, so every next-token target is kept
  -> chunks shuffled within a window, so a batch mixes many documents and not
     the consecutive chunks of one long file
  -> first-fit packed into rows of seq_len (a chunk never spans two rows)
  -> batched into batch_size // P rows.

Every stage is a grain dataset with checkpointable state, so the iterator's `get_state()` is a small
JSON-serialisable dict and `set_state()` resumes the exact continuation. Nothing is tokenized ahead
of need: the train split of the stdlib is ~30M byte tokens.

A batch is a dict of numpy arrays, all [rows, seq_len]: 'inputs' and 'targets' int32 (0 = padding),
'segment_ids' int32 (1, 2, ... for the chunks packed in a row, 0 for padding), 'positions' int32
(restarting at 0 in each segment) and 'weights' float32 (1.0 where a target is real).
"""

import numpy as np
import grain

from effjax.data import sources
from effjax.data import tokenizers

# Chunks shuffled together. About 15 stdlib files' worth at seq_len 256: a batch of 16 rows draws
# from many files, and restoring a checkpoint re-tokenizes at most one window.
CHUNK_SHUFFLE_WINDOW = 1024
# Documents read (and tokenized) ahead by background threads. One batch of 16 x 256 byte tokens is
# about a quarter of an average stdlib file; more read-ahead only delays the first batch.
READ_THREADS = 2
READ_AHEAD_DOCUMENTS = 16


class TokenizeDocument(grain.transforms.Map):
  """A document {'text', ...} -> int32 ids [bos] + tokens + [eos]."""

  def __init__(self, tokenizer: tokenizers.Tokenizer):
    self._tokenizer = tokenizer

  def map(self, document) -> np.ndarray:
    t = self._tokenizer
    if hasattr(t, 'encode_array'):
      ids = t.encode_array(document['text'])
    else:
      ids = np.asarray(t.encode(document['text']), dtype=np.int32)
    return np.concatenate([[t.bos_id], ids, [t.eos_id]]).astype(np.int32)


class CutIntoChunks(grain.experimental.FlatMapTransform):
  """Token ids -> chunks of at most seq_len + 1 tokens, consecutive ones sharing one token.

  The shared token is the last target of one chunk and the first input of the next, so no
  next-token prediction is lost at a cut.
  """

  max_fan_out = 1 << 30  # unused by the iterator flat map; one long file makes thousands

  def __init__(self, seq_len: int):
    self._seq_len = seq_len

  def flat_map(self, token_ids: np.ndarray) -> list[dict]:
    chunks = []
    for start in range(0, len(token_ids) - 1, self._seq_len):
      chunk = token_ids[start:start + self._seq_len + 1]
      chunks.append({'inputs': chunk[:-1], 'targets': chunk[1:]})
    return chunks


def to_model_batch(packed) -> dict:
  """grain's packing output ('inputs_segment_ids', ...) -> the batch the model reads."""
  return {
      'inputs': packed['inputs'].astype(np.int32),
      'targets': packed['targets'].astype(np.int32),
      'segment_ids': packed['inputs_segment_ids'].astype(np.int32),
      'positions': packed['inputs_positions'].astype(np.int32),
      'weights': (packed['targets_segment_ids'] > 0).astype(np.float32),
  }


def rows_per_host(config, process_count: int) -> int:
  batch_size = config.train.batch_size
  if process_count < 1 or batch_size % process_count:
    raise ValueError(f'train.batch_size={batch_size} must be divisible by the number of '
                     f'processes ({process_count}): each host yields batch_size // processes rows')
  return batch_size // process_count


def shuffle_seed(config) -> int:
  """`data.shuffle_seed`, or the global `seed` when it is -1; grain wants [0, 2**32)."""
  seed = config.data.shuffle_seed if config.data.shuffle_seed != -1 else config.seed
  return int(seed) % 2**32


def host_documents(config, split: str, process_index: int, process_count: int):
  """This host's disjoint slice of a split: every process_count-th document from process_index."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, {process_count})')
  return sources.load_documents(config, split)[process_index::process_count]


def _tokenized_chunks(documents, config, tokenizer, read_options) -> grain.IterDataset:
  documents = documents.map(TokenizeDocument(tokenizer))
  return grain.experimental.FlatMapIterDataset(
      documents.to_iter_dataset(read_options), CutIntoChunks(config.data.seq_len))


def _packed_rows(chunks: grain.IterDataset, seq_len: int, num_bins: int) -> grain.IterDataset:
  # Bins are not shuffled: the chunk order is already shuffled (train) or must stay put (eval).
  return grain.experimental.FirstFitPackIterDataset(
      chunks, length_struct={'inputs': seq_len, 'targets': seq_len},
      num_packing_bins=num_bins, shuffle_bins=False)


def train_dataset(config, tokenizer, *, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
  """The infinite training dataset of one host (see the module docstring for the stages)."""
  rows = rows_per_host(config, process_count)
  seed = shuffle_seed(config)
  documents = host_documents(config, 'train', process_index, process_count)
  if len(documents) == 0:
    raise ValueError(f'no training documents for host {process_index} of {process_count} '
                     f'(data.source={config.data.source!r}, '
                     f'data.max_documents={config.data.max_documents})')
  documents = documents.shuffle(seed=seed).repeat()  # a new order each epoch
  read_options = grain.ReadOptions(num_threads=READ_THREADS,
                                   prefetch_buffer_size=READ_AHEAD_DOCUMENTS)
  chunks = _tokenized_chunks(documents, config, tokenizer, read_options)
  chunks = grain.experimental.WindowShuffleIterDataset(
      chunks, window_size=CHUNK_SHUFFLE_WINDOW, seed=seed)
  rows_ds = _packed_rows(chunks, config.data.seq_len, num_bins=rows)
  batches = rows_ds.batch(rows, drop_remainder=True).map(to_model_batch)
  if config.data.num_workers > 0:
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  return batches


def make_train_iterator(config, *, process_index: int = 0, process_count: int = 1):
  """An endless iterator of this host's training batches; checkpoint it with get_state()."""
  tokenizer = tokenizers.make_tokenizer(config)
  dataset = train_dataset(config, tokenizer, process_index=process_index,
                          process_count=process_count)
  return iter(dataset)


# ---------------------------------------------------------------------------------- evaluation


def _pad_rows(batch: dict, rows: int) -> dict:
  """Appends all-padding rows (weights 0) so that every eval batch has the same shape."""
  missing = rows - batch['inputs'].shape[0]
  if missing == 0:
    return batch
  return {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)])
          for k, v in batch.items()}


def _empty_batch(rows: int, seq_len: int) -> dict:
  return _pad_rows(to_model_batch({
      'inputs': np.zeros((0, seq_len), np.int32), 'targets': np.zeros((0, seq_len), np.int32),
      'inputs_segment_ids': np.zeros((0, seq_len), np.int32),
      'inputs_positions': np.zeros((0, seq_len), np.int32),
      'targets_segment_ids': np.zeros((0, seq_len), np.int32),
  }), rows)


def _host_eval_batches(config, tokenizer, num_batches: int, process_index: int,
                       process_count: int) -> list[dict]:
  rows = rows_per_host(config, process_count)
  documents = host_documents(config, 'validation', process_index, process_count)
  if len(documents) == 0 or num_batches <= 0:
    return []
  chunks = _tokenized_chunks(documents, config, tokenizer, grain.ReadOptions(num_threads=0))
  packed = _packed_rows(chunks, config.data.seq_len, num_bins=rows)
  batches = []
  for batch in packed.batch(rows, drop_remainder=False).map(to_model_batch):
    batches.append(_pad_rows(batch, rows))
    if len(batches) == num_batches:
      break
  return batches


_eval_batches_cache: dict = {}


def make_eval_batches(config, num_batches: int, *, process_index: int = 0,
                      process_count: int = 1) -> list[dict]:
  """Up to num_batches validation batches of this host: no shuffle, the same list every call.

  Every host returns the same number of batches (an eval step is a collective over hosts): a host
  whose slice of the split runs out early gets all-padding batches (weights 0) to match. To know
  that number each host packs the other hosts' slices too; the validation split is small.
  """
  key = (config.data.to_json(), config.train.batch_size, num_batches, process_count)
  if key not in _eval_batches_cache:
    tokenizer = tokenizers.make_tokenizer(config)
    per_host = [_host_eval_batches(config, tokenizer, num_batches, host, process_count)
                for host in range(process_count)]
    most = max(len(batches) for batches in per_host)
    rows = rows_per_host(config, process_count)
    for batches in per_host:
      batches.extend(_empty_batch(rows, config.data.seq_len) for _ in range(most - len(batches)))
    _eval_batches_cache[key] = per_host
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, {process_count})')
  return _eval_batches_cache[key][process_index]
