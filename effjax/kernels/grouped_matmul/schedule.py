"""Which (m-tile, group) pairs the grouped matmul kernels visit, computed from group_sizes in JAX.

The rows [0, M) are cut into tiles of tm rows, and into contiguous row ranges ("segments"), one per
group. A kernel program (GPU) or grid step (TPU) handles one visit: an (m-tile, segment) pair that
overlap, and within the tile only the rows [lo, hi) of that segment. A tile that straddles a group
boundary is visited once per group it holds, so every visit owns a disjoint set of rows and no two
programs ever write the same output row. Visits come ordered by segment and within a segment by
tile; segments are contiguous and ascending, so the tile index never decreases along the list and
all visits to one tile (or one group) are consecutive, which the TPU kernels rely on to keep an
output block resident.

  gmm:  the segments are the G groups plus a tail segment, id G, holding the rows past
        sum(group_sizes); its visits write zeros, so every output row is written exactly once.
        Empty segments get no visit. Count <= T + G (T = M / tm): each of the at most G + 1
        non-empty segments adds at most one tile beyond the T of a partition of [0, M).
  tgmm: the segments are the G groups only; an empty group still gets one visit (owning no rows)
        so that its [K, N] output is written (as zeros). Count <= T + G - 1.

The grid needs a static length, so the tables are padded to that bound with no-op visits: they
repeat the last visit's tile and group (on TPU the resident blocks stay put, no new DMA) and own
no rows (lo == hi).

The tables are tiny int32 vectors (a cumsum and a loop-free searchsorted over G + 1 entries)
built inside the caller's jit, so group sizes may be traced values.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Visits(NamedTuple):
  """Per visit: m-tile index, segment id, and the owned absolute rows [lo, hi); int32 [V] each."""
  tile: jax.Array
  group: jax.Array
  lo: jax.Array
  hi: jax.Array


def gmm_visit_count(num_rows: int, tm: int, num_groups: int) -> int:
  return num_rows // tm + num_groups


def tgmm_visit_count(num_rows: int, tm: int, num_groups: int) -> int:
  return num_rows // tm + num_groups - 1


def _visits(starts, ends, num_rows: int, tm: int, num_visits: int, *, visit_empty: bool) -> Visits:
  """Visit tables for segments [starts[s], ends[s]) of [0, num_rows), padded to num_visits."""
  num_tiles = num_rows // tm
  nonempty = ends > starts
  first = jnp.minimum(starts // tm, num_tiles - 1)
  spanned = (ends + tm - 1) // tm - first
  count = jnp.where(nonempty, spanned, 1 if visit_empty else 0)
  cum = jnp.cumsum(count)
  total = cum[-1]
  v = jnp.minimum(jnp.arange(num_visits, dtype=jnp.int32), total - 1)  # no-ops repeat the last
  # One [V, S] comparison, not searchsorted's default binary search: that is a while loop, and
  # on the GPU every iteration of an XLA while loop copies its predicate to the host, so seven
  # iterations (64 experts) cost more wall time than the 0.2 ms kernel they schedule (profiled
  # on an H200: experiments/moe/README.md).
  seg = jnp.searchsorted(cum, v, side='right', method='compare_all').astype(jnp.int32)
  tile = first[seg] + v - (cum[seg] - count[seg])
  lo = jnp.maximum(starts[seg], tile * tm)
  hi = jnp.maximum(jnp.minimum(ends[seg], tile * tm + tm), lo)
  live = jnp.arange(num_visits) < total
  return Visits(tile.astype(jnp.int32), seg, lo.astype(jnp.int32),
                jnp.where(live, hi, lo).astype(jnp.int32))


def group_bounds(group_sizes: jax.Array, num_rows: int):
  """Group row ranges, clipped to [0, num_rows) so that a bad sum can't read out of bounds."""
  ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), num_rows)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  return starts, ends


def gmm_visits(group_sizes: jax.Array, num_rows: int, tm: int) -> Visits:
  """Visits for gmm over num_rows (a multiple of tm) rows; segment G is the zero tail."""
  starts, ends = group_bounds(group_sizes, num_rows)
  starts = jnp.append(starts, ends[-1])
  ends = jnp.append(ends, jnp.int32(num_rows))
  count = gmm_visit_count(num_rows, tm, group_sizes.shape[0])
  return _visits(starts, ends, num_rows, tm, count, visit_empty=False)


def tgmm_visits(group_sizes: jax.Array, num_rows: int, tm: int) -> Visits:
  """Visits for tgmm: every group at least once, rows past the groups never."""
  starts, ends = group_bounds(group_sizes, num_rows)
  count = tgmm_visit_count(num_rows, tm, group_sizes.shape[0])
  return _visits(starts, ends, num_rows, tm, count, visit_empty=True)
