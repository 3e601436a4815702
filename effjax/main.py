"""effjax entry point: `python -m effjax.main --config=configs/default.py --workdir=DIR`.

Any config field can be overridden, e.g. `--config.train.steps=100 --config.mesh.fsdp=2`.
`--mode` (or config.mode) picks train (default), eval or generate; `--mode=compile_only` compiles
the train and eval steps for the config's mesh from abstract shapes and reports their per-device
memory without initialising or running anything (effjax/train/compile_only.py); `--mode=compress`
writes a compressed copy of the latest checkpoint and a report (effjax/compress/run.py).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and metrics.')
_MODE = flags.DEFINE_enum('mode', None,
                          ['train', 'eval', 'generate', 'compile_only', 'compress'],
                          'Overrides config.mode when given.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  # Imported here so that --help stays fast and flags parse before JAX initialises.
  from effjax import config as config_lib
  from effjax.parallel import distributed
  from effjax.train import trainer

  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # libraries' INFO chatter off unless -v is asked for
  try:
    config = _CONFIG.value
    config.keys()  # a file that failed to load only raises on first use
  except OSError as e:  # the config file is missing or failed to import
    detail = ' '.join(str(e).split())
    print(f'effjax: config error: --config could not be loaded: {detail}', file=sys.stderr)
    sys.exit(2)
  if _MODE.value:
    with config.unlocked():
      config.mode = _MODE.value
  # Before validation: validate counts the devices, and the first look at them fixes JAX's view
  # to this process's local devices, after which jax.distributed can no longer start.
  try:
    distributed.maybe_initialize(config.distributed)
  except ValueError as e:
    print(f'effjax: config error: {e}', file=sys.stderr)
    sys.exit(2)
  try:
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    print(f'effjax: config error: {e}', file=sys.stderr)
    sys.exit(2)
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


def parse_flags(argv):
  """absl's parser, with config-override mistakes turned into one line and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    from effjax import config as config_lib
    message = config_lib.describe_override_error(argv, e)
    print(f'effjax: config error: {message}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
