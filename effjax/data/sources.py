"""Document sources: where the text comes from, split into train and validation.

Every source yields the same thing, a `grain.MapDataset` of documents
`{'text': str, 'id': str}`, so the pipeline never cares where the text came from. The id names the
document (the relative path for files, split and index for tfds) so tests and humans can check which
documents a split or a host saw.

  'stdlib'      the Python standard library installed with the interpreter, built once into a local
                tensorflow-datasets dataset (array_record) under the data dir;
  'text_files'  local files matched by `data.glob`, one document each, read lazily;
  'tfds'        a tensorflow-datasets dataset by `data.tfds_name`, prepared as array_record.

Train/validation membership of a file is a stable hash of its relative path, so it never changes
when files are added elsewhere, when the corpus is rebuilt, or between machines. tensorflow-datasets
is imported lazily: it costs half a second and only the 'stdlib' and 'tfds' sources need it.
"""

import contextlib
import fcntl
import glob as glob_lib
import hashlib
import os
import sys

import grain

SPLITS = ('train', 'validation')


def data_dir(config) -> str:
  """Where datasets and tokenizer models live: data.data_dir, $EFFJAX_DATA_DIR, ~/.cache/effjax."""
  path = config.data.data_dir or os.environ.get('EFFJAX_DATA_DIR') or '~/.cache/effjax'
  return os.path.abspath(os.path.expanduser(path))


def in_validation_split(relative_path: str, validation_percent: int) -> bool:
  """Whether a document belongs to the validation split: md5 of its path, stable everywhere."""
  digest = hashlib.md5(relative_path.encode('utf-8')).hexdigest()
  return int(digest, 16) % 100 < validation_percent


@contextlib.contextmanager
def file_lock(lock_path: str):
  """Holds an exclusive advisory lock, so that two processes never build the same thing at once."""
  os.makedirs(os.path.dirname(lock_path), exist_ok=True)
  with open(lock_path, 'a') as lock_file:
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock_file, fcntl.LOCK_UN)


def python_version_tag() -> str:
  """'python3_11': the stdlib differs between minor versions, so its dataset is keyed by this."""
  return f'python{sys.version_info.major}_{sys.version_info.minor}'


def source_key(config) -> str:
  """A file-name-safe name of the training documents a config reads; keys tokenizer models."""
  d = config.data
  if d.source == 'stdlib':
    key = f'stdlib-{python_version_tag()}-validation{d.validation_percent}'
  elif d.source == 'text_files':
    glob_digest = hashlib.md5(os.path.abspath(os.path.expanduser(d.glob)).encode()).hexdigest()
    key = f'text_files-{glob_digest[:12]}-validation{d.validation_percent}'
  elif d.source == 'tfds':
    safe_name = ''.join(c if c.isalnum() or c in '._-' else '_' for c in d.tfds_name)
    key = f'tfds-{safe_name}-{d.tfds_train_split}'
  else:
    raise ValueError(_unknown_source_message(d.source))
  if d.max_documents > 0:
    key += f'-max{d.max_documents}'
  return key


def load_documents(config, split: str) -> grain.MapDataset:
  """The documents of one split ('train' or 'validation'), capped at `data.max_documents`."""
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  source = config.data.source
  if source == 'stdlib':
    documents = _stdlib_documents(config, split)
  elif source == 'text_files':
    documents = _text_file_documents(config, split)
  elif source == 'tfds':
    documents = _tfds_documents(config, split)
  else:
    raise ValueError(_unknown_source_message(source))
  if config.data.max_documents > 0:
    documents = documents[:config.data.max_documents]
  return documents


def _unknown_source_message(source: str) -> str:
  return f"data.source={source!r} is not one of 'stdlib', 'text_files', 'tfds'"


# ------------------------------------------------------------------------------------ stdlib


def _stdlib_documents(config, split: str) -> grain.MapDataset:
  # Imported here: the builder imports tensorflow-datasets, and it imports this module.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from effjax.data.stdlib_corpus import stdlib_corpus_dataset_builder as stdlib_corpus
  root = data_dir(config)
  percent = config.data.validation_percent
  builder = stdlib_corpus.prepare(root, percent)
  if split not in builder.info.splits:  # an empty split is not built, e.g. validation_percent=0
    return grain.MapDataset.source([])
  records = tfds.data_source(stdlib_corpus.dataset_name(percent), split=split, data_dir=root,
                             download=False)
  return grain.MapDataset.source(records).map(_decode_stdlib_record)


def _decode_stdlib_record(record) -> dict:
  return {'text': record['text'].decode('utf-8'), 'id': record['path'].decode('utf-8')}


# -------------------------------------------------------------------------------- text files


class TextFileSource:
  """A grain random-access source over files: one document per file, read when asked for."""

  def __init__(self, paths: list[str], root: str):
    self._paths = paths
    self._root = root

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> dict:
    path = self._paths[index]
    with open(path, encoding='utf-8', errors='replace') as f:
      text = f.read()
    return {'text': text, 'id': os.path.relpath(path, self._root)}

  def __repr__(self) -> str:
    return f'TextFileSource(root={self._root!r}, files={len(self._paths)})'


def glob_root(pattern: str) -> str:
  """The directory above the first wildcard: relative paths (and so the split) are taken from it."""
  parts = pattern.split(os.sep)
  fixed = []
  for part in parts:
    if glob_lib.has_magic(part):
      break
    fixed.append(part)
  root = os.sep.join(fixed) if len(fixed) < len(parts) else os.path.dirname(pattern)
  return root or os.sep


def _text_file_documents(config, split: str) -> grain.MapDataset:
  pattern = config.data.glob
  if not pattern:
    raise ValueError("data.source='text_files' needs data.glob, e.g. '/data/books/**/*.txt'")
  pattern = os.path.abspath(os.path.expanduser(pattern))
  paths = sorted(p for p in glob_lib.glob(pattern, recursive=True) if os.path.isfile(p))
  if not paths:
    raise ValueError(f'data.glob={config.data.glob!r} matched no files')
  root = glob_root(pattern)
  want_validation = split == 'validation'
  paths = [
      p for p in paths
      if in_validation_split(os.path.relpath(p, root), config.data.validation_percent)
      == want_validation
  ]
  return grain.MapDataset.source(TextFileSource(paths, root))


# -------------------------------------------------------------------------------------- tfds


def _tfds_documents(config, split: str) -> grain.MapDataset:
  d = config.data
  if not d.tfds_name:
    raise ValueError("data.source='tfds' needs data.tfds_name, e.g. 'lm1b:1.1.0'")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds_split = d.tfds_train_split if split == 'train' else d.tfds_eval_split
  root = data_dir(config)
  try:
    records = tfds.data_source(d.tfds_name, split=tfds_split, data_dir=root, download=False)
  except Exception as e:  # tfds raises several types; the reader needs the field and the place.
    raise ValueError(
        f'data.tfds_name={d.tfds_name!r} (split {tfds_split!r}) is not available as an '
        f'array_record dataset under {root}: prepare it there with '
        f'`tfds build {d.tfds_name} --data_dir={root} --file_format=array_record` '
        f'({type(e).__name__}: {e})') from e
  return grain.MapDataset.source(records).map_with_index(
      TfdsRecordToDocument(d.tfds_name, tfds_split, d.tfds_text_key))


class TfdsRecordToDocument:
  """Picks the text feature out of a tfds record (a class, so that grain workers can pickle it)."""

  def __init__(self, tfds_name: str, split: str, text_key: str):
    self._tfds_name = tfds_name
    self._split = split
    self._text_key = text_key

  def __call__(self, index: int, record) -> dict:
    if self._text_key not in record:
      raise ValueError(f'data.tfds_text_key={self._text_key!r} is not a feature of '
                       f'{self._tfds_name!r}: it has {sorted(record)}')
    text = record[self._text_key]
    if isinstance(text, bytes):
      text = text.decode('utf-8', errors='replace')
    return {'text': str(text), 'id': f'{self._split}/{index}'}
