"""Named rematerialisation policies for each scanned group of layers.

'none' keeps every activation; 'full' recomputes the whole group in the backward pass (memory of
one carry per group); the others save a chosen subset (matmul outputs, or the tensors tagged with
`checkpoint_name` in the layers: 'block_out' after each residual add, 'attention_out').
"""

from __future__ import annotations

from typing import Callable

import jax

_cp = jax.checkpoint_policies

POLICIES: dict[str, Callable | None] = {
    'none': None,
    'full': _cp.nothing_saveable,
    'dots': _cp.dots_saveable,
    'dots_no_batch': _cp.dots_with_no_batch_dims_saveable,
    'block_outputs': _cp.save_only_these_names('block_out'),
    'attention_out': _cp.save_only_these_names('attention_out'),
}


def apply(fn: Callable, policy_name: str, in_scan: bool) -> Callable:
  """fn wrapped in jax.checkpoint with the named policy.

  Outside a scan, prevent_cse must stay on: otherwise XLA's common-subexpression elimination merges
  the backward pass's recomputation with the forward pass and silently undoes the remat (seen: a
  1B model's peak memory and step time identical with 'none' and 'attention_out'). Inside a scan
  the loop already keeps them apart, and turning it off avoids needless optimisation barriers.
  """
  if policy_name not in POLICIES:
    raise KeyError(f'model.remat_policy={policy_name!r}; allowed: {", ".join(POLICIES)}')
  if policy_name == 'none':
    return fn
  return jax.checkpoint(fn, policy=POLICIES[policy_name], prevent_cse=not in_scan)
