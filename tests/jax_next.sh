#!/usr/bin/env bash
# The GPU kernels' tests that need a newer JAX than the main suite's: JAX 0.11's Mosaic GPU
# interpreter runs the Hopper flash-attention kernels (TMA, barriers, wgmma) on a CPU, alone and
# inside the model's attention layers. JAX 0.11 needs Python >= 3.12, so this makes a throwaway
# virtual environment with it and the package (any python3.12 on PATH or under pyenv) and runs
# those test files there. Without a Python 3.12 it says so and
# exits 0: the main suite still lowers the same kernels for CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."
JAX_NEXT=${JAX_NEXT:-0.11.2}
python312=
for candidate in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python; do
  if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    python312=$candidate
    break
  fi
done
if [ -z "$python312" ]; then
  echo "tests/jax_next.sh: no Python 3.12 found; the JAX $JAX_NEXT interpreter tests did not run"
  exit 0
fi
venv=$(mktemp -d "${TMPDIR:-/tmp}/effjax-jax-next.XXXXXX")
trap 'rm -rf "$venv"' EXIT
"$python312" -m venv "$venv" || exit 1
"$venv/bin/python" -m pip install -q "jax==$JAX_NEXT" -e . pytest || exit 1
"$venv/bin/python" -m pytest -p no:cacheprovider tests/kernels/test_flash_attention_mosaic_gpu.py \
  tests/models/test_attention_mosaic_gpu.py "$@"
