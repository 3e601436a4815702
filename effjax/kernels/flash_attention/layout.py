"""Block-level attention masks and the tile bookkeeping shared by the kernels.

A `BlockLayout` says, on a grid of [S/block, S/block] token blocks, which query block may attend to
which key block (BigBird / Longformer style sparsity). Kernels work on tiles of
[block_q, block_k] tokens; `computed_blocks` says which tiles hold at least one allowed
(query, key) pair once the layout is combined with the causal and sliding-window rules. Those tiles
are the only ones a kernel visits, so they are also what `attention_flops` counts: the honest number
of FLOPs spent, not the FLOPs of a dense S x S attention. `block_csr` turns a tile mask into the
per-row index lists the kernels walk (rows = query blocks in the forward pass, key blocks for the
backward's transposed lists).

Segment ids are data, not static structure, so they never remove tiles here; a kernel masks them
token by token inside the tiles it visits.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """Static block mask: rows[i][j] is True when query block i may attend to key block j."""
  block: int
  rows: tuple[tuple[bool, ...], ...]

  def __post_init__(self):
    if self.block < 1:
      raise ValueError(f'BlockLayout.block must be >= 1, got {self.block}')
    n = len(self.rows)
    if any(len(row) != n for row in self.rows):
      raise ValueError(f'BlockLayout.rows must be square, got {n} rows of lengths '
                       f'{sorted({len(row) for row in self.rows})}')

  @classmethod
  def from_array(cls, block: int, mask) -> BlockLayout:
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
      raise ValueError(f'BlockLayout needs a square 2-D block mask, got shape {mask.shape}')
    return cls(int(block), tuple(tuple(bool(x) for x in row) for row in mask))

  def array(self) -> np.ndarray:
    return np.array(self.rows, dtype=bool).reshape(self.num_blocks, self.num_blocks)

  @property
  def num_blocks(self) -> int:
    return len(self.rows)

  @property
  def seq_len(self) -> int:
    return self.block * self.num_blocks


def bigbird_layout(seq_len: int, block: int, *, local_blocks: int, global_blocks: int,
                   random_blocks: int = 0, seed: int = 0, causal: bool = True) -> BlockLayout:
  """Local band + global blocks + `random_blocks` random key blocks per query block.

  The band covers `local_blocks` key blocks ending at the query's own block (and as many to its
  right when not causal). The first `global_blocks` key blocks are seen by every query block and
  those query blocks see every key block. With causal=True everything above the diagonal is
  dropped, and random blocks are drawn only from the query's past. random_blocks=0 is Longformer.
  """
  if seq_len % block:
    raise ValueError(f'seq_len={seq_len} must be a multiple of the layout block {block}')
  if local_blocks < 1:
    raise ValueError(f'local_blocks must be >= 1 (the diagonal), got {local_blocks}')
  n = seq_len // block
  i = np.arange(n)[:, None]
  j = np.arange(n)[None, :]
  mask = (i - j >= 0) & (i - j < local_blocks)
  if not causal:
    mask |= (j - i >= 0) & (j - i < local_blocks)
  mask |= j < global_blocks
  mask |= i < global_blocks
  rng = np.random.default_rng(seed)
  for row in range(n):
    candidates = np.flatnonzero(~mask[row] & ((np.arange(n) <= row) | (not causal)))
    take = min(random_blocks, candidates.size)
    if take:
      mask[row, rng.choice(candidates, size=take, replace=False)] = True
  if causal:
    mask &= i >= j
  return BlockLayout.from_array(block, mask)


def _expand(layout: BlockLayout, block_q: int, block_k: int) -> np.ndarray:
  """The layout on the [S/block_q, S/block_k] tile grid (each tile lies inside one layout cell)."""
  for name, b in (('block_q', block_q), ('block_k', block_k)):
    if layout.block % b:
      raise ValueError(f'layout.block={layout.block} must be a multiple of {name}={b}; '
                       f'pick {name} dividing {layout.block}')
  return np.repeat(np.repeat(layout.array(), layout.block // block_q, axis=0),
                   layout.block // block_k, axis=1)


def computed_blocks(seq_len: int, block_q: int, block_k: int, *, causal: bool,
                    window: int | None = None, layout: BlockLayout | None = None) -> np.ndarray:
  """[S/block_q, S/block_k] bool: tiles holding at least one allowed (query, key) pair."""
  if seq_len % block_q or seq_len % block_k:
    raise ValueError(f'seq_len={seq_len} must be a multiple of block_q={block_q} and '
                     f'block_k={block_k}')
  if layout is not None and layout.seq_len != seq_len:
    raise ValueError(f'layout covers {layout.seq_len} tokens ({layout.num_blocks} blocks of '
                     f'{layout.block}) but seq_len={seq_len}')
  # Token ranges of every tile: queries [q0, q1], keys [k0, k1] (inclusive).
  q0 = np.arange(seq_len // block_q)[:, None] * block_q
  q1 = q0 + block_q - 1
  k0 = np.arange(seq_len // block_k)[None, :] * block_k
  k1 = k0 + block_k - 1
  if causal:
    # Some query i in [q0, q1] has a key j in [k0, k1] with i - w < j <= i: i >= k0 and i < k1 + w.
    lo = np.maximum(q0, k0)
    hi = q1 if window is None else np.minimum(q1, k1 + window - 1)
    blocks = lo <= hi
  elif window is not None:
    gap = np.maximum(0, np.maximum(k0 - q1, q0 - k1))  # distance between the two token ranges
    blocks = gap < window
  else:
    blocks = np.ones((q0.shape[0], k0.shape[1]), dtype=bool)
  if layout is not None:
    blocks = blocks & _expand(layout, block_q, block_k)
  return np.asarray(blocks, dtype=bool)


def unmasked_blocks(seq_len: int, block_q: int, block_k: int, *, causal: bool,
                    window: int | None = None) -> np.ndarray:
  """[S/block_q, S/block_k] bool: tiles where every pair passes the causal and window rules.

  Such tiles need no token mask (a layout is constant on a tile, so it never makes one partial;
  segment ids are not considered here and make every tile partial).
  """
  q0 = np.arange(seq_len // block_q)[:, None] * block_q
  q1 = q0 + block_q - 1
  k0 = np.arange(seq_len // block_k)[None, :] * block_k
  k1 = k0 + block_k - 1
  full = np.ones((q0.shape[0], k0.shape[1]), dtype=bool)
  if causal:
    full &= k1 <= q0  # the last key precedes the first query
    if window is not None:
      full &= q1 - window < k0  # the last query still sees the first key
  elif window is not None:
    full &= np.maximum(q1 - k0, k1 - q0) < window
  return full


def block_csr(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Row-wise column lists of a bool tile mask: (indices int32 [rows, max(nnz, 1)], counts).

  Rows are padded by repeating their last valid index (0 for an empty row) so a kernel that
  prefetches one step past its count still reads a valid, already-resident block.
  """
  blocks = np.asarray(blocks, dtype=bool)
  counts = blocks.sum(axis=1).astype(np.int32)
  width = max(int(counts.max(initial=0)), 1)
  indices = np.zeros((blocks.shape[0], width), dtype=np.int32)
  for row in range(blocks.shape[0]):
    cols = np.flatnonzero(blocks[row])
    if cols.size:
      indices[row, :cols.size] = cols
      indices[row, cols.size:] = cols[-1]
  return indices, counts


def token_mask(seq_len: int, *, causal: bool, window: int | None = None,
               layout: BlockLayout | None = None) -> np.ndarray:
  """[S, S] bool of the static rules (no segment ids): the spec computed_blocks summarises."""
  i = np.arange(seq_len)[:, None]
  j = np.arange(seq_len)[None, :]
  mask = np.ones((seq_len, seq_len), dtype=bool)
  if causal:
    mask &= j <= i
  if window is not None:
    mask &= (i - window < j) if causal else (np.abs(i - j) < window)
  if layout is not None:
    mask &= layout.array()[i // layout.block, j // layout.block]
  return mask


def attention_flops(batch: int, seq_len: int, num_heads: int, head_dim: int, *, block_q: int,
                    block_k: int, causal: bool, window: int | None = None,
                    layout: BlockLayout | None = None, backward: bool = False) -> float:
  """FLOPs of the tiles a kernel computes: 2 matmuls per tile forward, 5 for the backward pass.

  backward=True gives the backward pass alone (2.5x the forward); a training step costs the sum.
  """
  tiles = int(computed_blocks(seq_len, block_q, block_k, causal=causal, window=window,
                              layout=layout).sum())
  forward = 4.0 * batch * num_heads * head_dim * block_q * block_k * tiles
  return 2.5 * forward if backward else forward


def mask_fraction(seq_len: int, *, block_q: int, block_k: int, causal: bool,
                  window: int | None = None, layout: BlockLayout | None = None) -> float:
  """Share of the computed tiles' (query, key) pairs that are allowed: the kernel's useful work."""
  tiles = int(computed_blocks(seq_len, block_q, block_k, causal=causal, window=window,
                              layout=layout).sum())
  allowed = int(token_mask(seq_len, causal=causal, window=window, layout=layout).sum())
  return allowed / max(tiles * block_q * block_k, 1)


def retile(blocks: np.ndarray, seq_len: int, block_q: int, block_k: int, new_q: int, new_k: int,
           *, causal: bool, window: int | None) -> np.ndarray:
  """The computed-tile mask of another tiling, exact for any pair of block sizes.

  Goes through the tiling of their greatest common divisors: a fine tile is needed when its
  coarse tile was (a layout is constant on a coarse tile) and the causal and window rules leave
  it a pair; a new tile is needed when any fine tile inside it is.
  """
  fq, fk = math.gcd(block_q, new_q), math.gcd(block_k, new_k)
  fine = np.repeat(np.repeat(np.asarray(blocks, dtype=bool), block_q // fq, axis=0),
                   block_k // fk, axis=1)
  fine &= computed_blocks(seq_len, fq, fk, causal=causal, window=window)
  nq, nk = seq_len // new_q, seq_len // new_k
  return fine.reshape(nq, new_q // fq, nk, new_k // fk).any(axis=(1, 3))
