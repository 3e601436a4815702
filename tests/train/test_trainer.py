"""The training loop's guard: a run that goes non-finite stops with a message naming the step."""

import pytest

from effjax.train import trainer
from tests.helpers import tiny_config


def _exploding_config(tmp_path, data_dir, policy):
  config = tiny_config()
  config.data.data_dir = data_dir
  config.data.max_documents = 20
  config.train.batch_size = 8
  config.train.steps = 8
  config.train.log_every = 1
  config.train.eval_every = 0
  config.train.checkpoint_every = 100
  config.train.nan_policy = policy
  config.train.max_consecutive_nan_skips = 3
  config.optim.warmup_steps = 0
  config.optim.schedule = 'constant'
  config.optim.learning_rate = 1e30  # the first update overflows the weights
  config.generate.at_end = False
  return config


def test_nan_policy_stop(tmp_path, stdlib_data_dir):
  config = _exploding_config(tmp_path, stdlib_data_dir, 'stop')
  with pytest.raises(trainer.NonFiniteLossError, match=r'non-finite loss or gradient at step 2: '
                     r'the update was not applied; stopping \(train\.nan_policy=stop\)'):
    trainer.train(config, str(tmp_path))


def test_nan_policy_skip_gives_up_after_consecutive_failures(tmp_path, stdlib_data_dir):
  config = _exploding_config(tmp_path, stdlib_data_dir, 'skip')
  with pytest.raises(trainer.NonFiniteLossError, match=r'at step 4: .*3 non-finite steps in a row'):
    trainer.train(config, str(tmp_path))
