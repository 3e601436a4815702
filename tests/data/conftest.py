"""Data test fixtures: small configs on the session's data dir (see tests/conftest.py)."""

import random

import pytest

from configs import base


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
