"""Lowering Pallas Triton kernels for CUDA on a CPU machine, to catch what only a GPU would see.

Interpret mode runs a kernel's Python semantics; it never builds the Triton module. Exporting for
platform 'cuda' does, here, without a GPU: with the kernel module's pallas_call in debug mode the
module is printed, and MLIR prints a module that fails verification in its generic form
("op"(...) instead of `op ...`). That is how a mistyped loop bound once looked, and it failed only
on the GPU.
"""

from __future__ import annotations

import functools

import jax
from jax import export
from jax.experimental import pallas as pl


def triton_dump(monkeypatch, capfd, kernel_module, fn, *shapes) -> str:
  """The printed Triton modules of fn(*shapes) lowered for CUDA (fn calls kernel_module)."""
  monkeypatch.setattr(kernel_module.pl, 'pallas_call', functools.partial(pl.pallas_call,
                                                                         debug=True))
  check = export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')
  capfd.readouterr()
  export.export(jax.jit(fn), platforms=['cuda'], disabled_checks=[check])(*shapes)
  return capfd.readouterr().out


# Ops MLIR prints in the generic form even in a verified module (no custom assembly format).
_ALWAYS_GENERIC = ('"tt.reduce"', '"tt.reduce.return"', '"tt.scan"', '"tt.scan.return"')


def assert_verified(dump: str, kernels: int) -> None:
  """`kernels` Triton modules were printed, every one of them verified."""
  assert dump.count('tt.func') >= kernels, dump[-2000:]
  generic = [line for line in dump.splitlines()
             if any(f'"{d}.' in line for d in ('tt', 'scf', 'arith', 'math'))
             and not any(op in line for op in _ALWAYS_GENERIC)]
  assert not generic, '\n'.join(generic[:5])
