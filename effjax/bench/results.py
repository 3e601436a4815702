"""Benchmark result files: one JSON with everything, one markdown table for READMEs.

Every file records what a reader needs to trust or repeat the numbers: the device, the software
versions, the exact command and, per row, the full config. Files are never overwritten: a name
that exists gets a numeric suffix.

The code is named twice: the git commit (with '+dirty' for uncommitted changes to tracked
files) and `code_digest`, a hash of the effjax package's Python sources as they ran. A copy of a
working tree whose git metadata lags its files (a benchmark run on another machine) records a
stale commit but the true digest; `python -m effjax.bench.results` prints the digest of the
checkout it runs in, to match a result file to a commit.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from typing import Any, Sequence

import jax


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def _git_commit() -> str | None:
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=here, capture_output=True,
                         text=True, timeout=10, check=False)
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=here,
                           capture_output=True, text=True, timeout=10, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  if out.returncode:
    return None
  return out.stdout.strip() + ('+dirty' if dirty.stdout.strip() else '')


def code_digest() -> str:
  """The first 12 hex digits of a SHA-256 over the effjax package's .py files (relative paths
  and contents, in sorted order)."""
  package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  h = hashlib.sha256()
  files = []
  for root, dirs, names in os.walk(package):
    dirs[:] = sorted(d for d in dirs if d != '__pycache__')
    files.extend(os.path.join(root, n) for n in names if n.endswith('.py'))
  for path in sorted(files, key=lambda p: os.path.relpath(p, package)):
    h.update(os.path.relpath(path, package).replace(os.sep, '/').encode() + b'\0')
    with open(path, 'rb') as f:
      h.update(f.read() + b'\0')
  return h.hexdigest()[:12]


def environment() -> dict[str, Any]:
  devices = jax.devices()
  return {
      'date_utc': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S'),
      'device_kind': devices[0].device_kind,
      'platform': devices[0].platform,
      'num_devices': len(devices),
      'num_processes': jax.process_count(),
      'jax': jax.__version__,
      'jaxlib': _version('jaxlib'),
      'flax': _version('flax'),
      'optax': _version('optax'),
      'python': platform.python_version(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'git_commit': _git_commit(),
      'code_digest': code_digest(),
      'command': ' '.join(shlex.quote(a) for a in [os.path.basename(sys.executable), '-m',
                                                    'effjax.bench', *sys.argv[1:]]),
  }


def _free_path(directory: str, stem: str, suffix: str) -> str:
  path = os.path.join(directory, stem + suffix)
  n = 2
  while os.path.exists(path):
    path = os.path.join(directory, f'{stem}-{n}{suffix}')
    n += 1
  return path


def _cell(value: Any, fmt: str) -> str:
  if value is None:
    return '-'
  if isinstance(value, float):
    return format(value, fmt)
  return str(value)


def markdown(env: dict[str, Any], columns: Sequence[tuple[str, str, str]],
             rows: Sequence[dict[str, Any]], title: str) -> str:
  """columns: (row key, header, format spec for floats)."""
  lines = [f'### {title}', '',
           f'{env["num_devices"]} x {env["device_kind"]} ({env["platform"]}), JAX {env["jax"]}, '
           f'flax {env["flax"]}, optax {env["optax"]}, commit {env["git_commit"]}'
           + (f' (code {env["code_digest"]})' if env.get('code_digest') else '') +
           f', {env["date_utc"]} UTC.',
           '', f'`{env["command"]}`', '']
  if env.get('xla_flags'):
    lines += [f'XLA_FLAGS=`{env["xla_flags"]}`', '']
  lines.append('| ' + ' | '.join(h for _, h, _ in columns) + ' |')
  lines.append('| ' + ' | '.join('---' for _ in columns) + ' |')
  for row in rows:
    lines.append('| ' + ' | '.join(_cell(row.get(k), f) for k, _, f in columns) + ' |')
  return '\n'.join(lines) + '\n'


def write(directory: str, stem: str, env: dict[str, Any], rows: list[dict[str, Any]],
          columns: Sequence[tuple[str, str, str]], title: str) -> tuple[str, str]:
  """Writes <stem>.json and <stem>.md (suffixed if taken); returns their paths."""
  os.makedirs(directory, exist_ok=True)
  json_path = _free_path(directory, stem, '.json')
  md_path = json_path[:-len('.json')] + '.md'
  with open(json_path, 'w', encoding='utf-8') as f:
    json.dump({'environment': env, 'rows': rows}, f, indent=2, default=str)
  with open(md_path, 'w', encoding='utf-8') as f:
    f.write(markdown(env, columns, rows, title))
  return json_path, md_path


if __name__ == '__main__':
  print(code_digest())
