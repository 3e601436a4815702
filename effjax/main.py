"""effjax entry point: `python -m effjax.main --config=configs/default.py --workdir=DIR`.

Any config field can be overridden, e.g. `--config.train.steps=100 --config.mesh.fsdp=2`.
`--mode` (or config.mode) picks train (default), eval or generate.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and metrics.')
_MODE = flags.DEFINE_enum('mode', None, ['train', 'eval', 'generate'],
                          'Overrides config.mode when given.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  # Imported here so that --help stays fast and flags parse before JAX initialises.
  from effjax import config as config_lib
  from effjax.parallel import distributed
  from effjax.train import trainer

  config = _CONFIG.value
  if _MODE.value:
    with config.unlocked():
      config.mode = _MODE.value
  try:
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    print(f'effjax: config error: {e}', file=sys.stderr)
    sys.exit(2)
  distributed.maybe_initialize(config.distributed)
  cache = os.environ.get('JAX_COMPILATION_CACHE_DIR')
  if cache:
    import jax
    jax.config.update('jax_compilation_cache_dir', cache)
  logging.info('config:\n%s', config)
  try:
    trainer.MODES[config.mode](config, _WORKDIR.value)
  except (ValueError, FileNotFoundError, trainer.NonFiniteLossError) as e:
    # Problems only visible once data, devices or checkpoints are seen: one line, no traceback.
    print(f'effjax: error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
