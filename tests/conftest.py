"""Test setup: 8 forced host devices so every mesh layout can be exercised on one CPU."""

import os

# LLVM optimisation level 0 cuts CPU compile time ~3x (17 s -> 5 s for a tiny train step); tests
# compare numbers computed under the same flags, so the slower generated code costs nothing here.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# One persistent XLA compilation cache per test run, shared by the xdist workers (they inherit
# the controller's environment) and by the command-line tests' subprocesses: a program compiled
# once (the same tiny model trained, resumed, evaluated and sampled by four `effjax.main` runs) is
# loaded from it afterwards. Tracing still happens; only XLA's compile is skipped.
_OWN_CACHE = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import tempfile
  _OWN_CACHE = os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(
      prefix='effjax_test_xla_cache_')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.3')

import jax  # noqa: E402  (after the flags above)

assert jax.device_count() == 8, 'tests expect 8 forced CPU devices; import jax after conftest'


import time  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def stdlib_data_dir(tmp_path_factory) -> str:
  """A data dir holding the stdlib dataset (default split), built once for the whole session."""
  from configs import base
  from effjax.data import sources
  path = str(tmp_path_factory.mktemp('effjax_data'))
  config = base.get_config()
  config.data.data_dir = path
  start = time.perf_counter()
  sources.load_documents(config, 'train')
  print(f'\nbuilt the stdlib dataset in {time.perf_counter() - start:.2f} s')
  return path


def pytest_sessionfinish(session):
  """The run's compilation cache is removed by the process that made it (not by xdist workers)."""
  if _OWN_CACHE and not hasattr(session.config, 'workerinput'):
    import shutil
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
