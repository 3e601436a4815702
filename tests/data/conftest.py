"""Data test fixtures: the stdlib dataset is built once per session into a temporary data dir."""

import random
import time

import pytest

from configs import base
from effjax.data import sources


@pytest.fixture(scope='session')
def stdlib_data_dir(tmp_path_factory) -> str:
  """A data dir holding the stdlib dataset (default split), built once for all data tests."""
  path = str(tmp_path_factory.mktemp('effjax_data'))
  config = base.get_config()
  config.data.data_dir = path
  start = time.perf_counter()
  sources.load_documents(config, 'train')
  print(f'\nbuilt the stdlib dataset in {time.perf_counter() - start:.2f} s')
  return path


@pytest.fixture
def make_config(stdlib_data_dir):
  """get_config() on the session's data dir, made small: returns f(**data_overrides) -> config."""

  def make(*, batch_size: int = 8, seed: int = 0, **data_overrides):
    config = base.get_config()
    config.seed = seed
    config.train.batch_size = batch_size
    config.data.data_dir = stdlib_data_dir
    config.data.seq_len = 64
    config.data.max_documents = 40
    for name, value in data_overrides.items():
      config.data[name] = value
    return config

  return make


@pytest.fixture
def fresh_seed() -> int:
  """A new random seed each test, printed so that a failure can be replayed."""
  seed = random.SystemRandom().randrange(2**31)
  print(f'fresh_seed={seed}')
  return seed
