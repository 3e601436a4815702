"""The Python standard library as a tensorflow-datasets dataset, written as array_record.

Why this corpus: it is on every machine that runs effjax, so a quickstart trains on real text with
no download, and a researcher can read the samples. It is never copied into the repository; it is
read from `sysconfig.get_paths()['stdlib']` when the dataset is built.

Why tensorflow-datasets: the built dataset has the standard layout, metadata and split bookkeeping,
and `as_data_source` gives grain random access without TensorFlow. A builder config names the
Python minor version (the stdlib differs between 3.11 and 3.12) and the validation percent (the
splits are decided at build time by `sources.in_validation_split`).

`prepare` builds once per data dir under a file lock; tensorflow-datasets writes into an
`incomplete.*` folder and renames it when done, so a crash never leaves a half dataset that looks
finished, and the lock keeps two processes from racing on that rename.
"""

import contextlib
import dataclasses
import os
import sysconfig
import tokenize

from absl import logging
from etils import epath
import tensorflow_datasets as tfds

from effjax.data import sources

EXCLUDED_DIRS = ('site-packages', 'dist-packages')


def stdlib_python_files(stdlib_dir: str | None = None) -> list[tuple[str, str]]:
  """(relative path, absolute path) of every `*.py` of the stdlib, sorted by relative path."""
  stdlib_dir = stdlib_dir or sysconfig.get_paths()['stdlib']
  found = []
  for directory, subdirs, files in os.walk(stdlib_dir):
    subdirs[:] = [s for s in subdirs if s not in EXCLUDED_DIRS and s != '__pycache__']
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(directory, name)
        found.append((os.path.relpath(path, stdlib_dir), path))
  return sorted(found)


def read_python_source(path: str) -> str:
  """The text of a source file in its declared encoding (PEP 263), undecodable bytes replaced.

  A few stdlib test files are deliberately in latin-1 or koi8-r, or carry a broken coding cookie.
  """
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    with open(path, 'rb') as f:
      encoding, _ = tokenize.detect_encoding(f.readline)
  except (SyntaxError, LookupError):
    encoding = 'utf-8'
  try:
    return raw.decode(encoding, errors='replace')
  except LookupError:
    return raw.decode('utf-8', errors='replace')


@dataclasses.dataclass
class StdlibCorpusConfig(tfds.core.BuilderConfig):
  validation_percent: int = 2


def builder_config(validation_percent: int) -> StdlibCorpusConfig:
  if not 0 <= validation_percent <= 100:
    raise ValueError(f'data.validation_percent must be in [0, 100], got {validation_percent}')
  return StdlibCorpusConfig(
      name=f'{sources.python_version_tag()}_validation{validation_percent}',
      description=(f'*.py files of the {sources.python_version_tag()} standard library; '
                   f'{validation_percent}% held out by md5 of the relative path.'),
      validation_percent=validation_percent)


class Builder(tfds.core.GeneratorBasedBuilder):
  """Documents {'text', 'path'}: one per stdlib source file; splits 'train' and 'validation'."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First version.'}
  # One config per validation percent of this Python, so that each is known by name.
  BUILDER_CONFIGS = [builder_config(percent) for percent in range(101)]
  DEFAULT_BUILDER_CONFIG_NAME = builder_config(2).name

  # tensorflow-datasets 4.9.10 finds a builder's code through `importlib_resources`, a backport it
  # no longer installs on Python >= 3.9; naming the file directly avoids that import.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'text': tfds.features.Text(),
            'path': tfds.features.Text(),
        }),
        description=('The *.py files of the Python standard library installed with the '
                     'interpreter that built it, one document per file, read at build time.'),
        homepage='https://docs.python.org/3/library/',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    percent = self.builder_config.validation_percent
    files_of_split = {'train': [], 'validation': []}
    for relative_path, path in stdlib_python_files():
      split = 'validation' if sources.in_validation_split(relative_path, percent) else 'train'
      files_of_split[split].append((relative_path, path))
    # tensorflow-datasets refuses an empty split (validation_percent 0 or 100): leave it out.
    return {split: self._generate_examples(files)
            for split, files in files_of_split.items() if files}

  def _generate_examples(self, files):
    for relative_path, path in files:
      yield relative_path, {'text': read_python_source(path), 'path': relative_path}


def dataset_name(validation_percent: int) -> str:
  """The name tfds.data_source knows it by, e.g. 'stdlib_corpus/python3_11_validation2:1.0.0'."""
  return f'{Builder.name}/{builder_config(validation_percent).name}:{Builder.VERSION}'


@contextlib.contextmanager
def _quiet_tfds():
  """tfds warns that a not-yet-built dataset folder has no metadata: expected here, so hidden."""
  level = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(level)


def prepare(data_dir: str, validation_percent: int) -> Builder:
  """The builder of this Python's stdlib dataset under data_dir, built first if it is not there."""
  config_name = builder_config(validation_percent).name
  make = lambda: Builder(data_dir=data_dir, config=config_name, file_format='array_record')
  with _quiet_tfds():
    builder = make()
    prepared = builder.is_prepared()
  if prepared:
    return builder
  lock_path = os.path.join(data_dir, 'locks', f'{builder.name}-{config_name}.lock')
  with sources.file_lock(lock_path):
    # Another process may have finished the build while we waited; a fresh builder looks again.
    with _quiet_tfds():
      builder = make()
      prepared = builder.is_prepared()
    if not prepared:
      print(f'building the stdlib corpus dataset under {data_dir} (once; about a second)', flush=True)
      tfds.disable_progress_bar()
      builder.download_and_prepare()
      builder = make()
  return builder
