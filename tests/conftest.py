"""Test setup: 8 forced host devices so every mesh layout can be exercised on one CPU."""

import os


def _xla_knows(flag: str) -> bool:
  """Whether the installed XLA defines a flag (it aborts on unknown XLA_FLAGS), found by name in
  jaxlib's shared libraries without importing them."""
  import importlib.util
  import mmap
  spec = importlib.util.find_spec('jaxlib')
  if spec is None or not spec.origin:
    return False
  folder = os.path.dirname(spec.origin)
  for name in os.listdir(folder):
    if name.endswith('.so'):
      with open(os.path.join(folder, name), 'rb') as f:
        if not os.fstat(f.fileno()).st_size:
          continue
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as image:
          if image.find(flag.encode()) >= 0:
            return True
  return False


# Seen on a 2-core CPU: LLVM optimisation level 0 cuts compile time ~3x (17 s -> 5 s for a tiny
# train step), and the older elemental emitter in place of XLA:CPU's fusion emitters another
# 1.7-4x (a one-layer Mamba-2 train step 2.1 s -> 0.75 s, the 4-mixer hybrid on 2x2x2 8.1 s ->
# 4.7 s); compile is most of this suite's time. Tests compare numbers computed under the same
# flags, so the slower generated code costs nothing here.
_FLAGS = ['--xla_force_host_platform_device_count=8', '--xla_backend_optimization_level=0']
def _jaxlib_before(major: int, minor: int) -> bool:
  """Whether the installed jaxlib is older than major.minor (from its metadata: no import)."""
  from importlib import metadata
  try:
    version = metadata.version('jaxlib')
  except metadata.PackageNotFoundError:
    return False
  return tuple(int(p) for p in version.split('.')[:2]) < (major, minor)


# jaxlib 0.11 still carries the emitter flag's name in its libraries but no longer accepts it.
if _jaxlib_before(0, 11) and _xla_knows('xla_cpu_use_fusion_emitters'):
  _FLAGS.append('--xla_cpu_use_fusion_emitters=false')
os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''), *_FLAGS]).strip()
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
