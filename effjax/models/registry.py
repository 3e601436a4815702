"""Registries of interchangeable layer parts.

A block of the layer stack is (mixer, feed-forward). Each part registers its class under a name
used in `config.model.pattern`; the class is built as `cls(model_cfg, rngs=rngs)` and called as
`part(x_btd, ctx)` where ctx holds positions and segment ids. Each class also provides
`flops_per_token(model_cfg, seq_len)`: forward matmul FLOPs per token, for MFU accounting.
"""

from __future__ import annotations

from effjax.registry import Registry

MIXERS = Registry('mixer')
FEED_FORWARDS = Registry('feed-forward')


def parse_pattern(pattern: str) -> tuple[tuple[str, str], ...]:
  """'attention:mlp, attention:mlp' -> (('attention', 'mlp'), ('attention', 'mlp'))."""
  blocks = []
  for part in pattern.split(','):
    part = part.strip()
    if not part:
      continue
    pieces = [p.strip() for p in part.split(':')]
    if len(pieces) != 2 or not all(pieces):
      raise ValueError(f'model.pattern={pattern!r}: each block is "mixer:feed_forward", got {part!r}')
    blocks.append((pieces[0], pieces[1]))
  if not blocks:
    raise ValueError(f'model.pattern={pattern!r} has no blocks; write e.g. "attention:mlp"')
  return tuple(blocks)
