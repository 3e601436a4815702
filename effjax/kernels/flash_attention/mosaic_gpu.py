"""Block-sparse flash attention forward as a Pallas Mosaic GPU kernel (Hopper: TMA + wgmma).

Why a second GPU backend. The Triton lowering cannot use Hopper's asynchronous tensor-core
instructions (wgmma) or its copy engine (TMA) explicitly, and reaches 0.64-0.89x cuDNN on an
H200. Mosaic GPU exposes both, so a kernel can follow the FlashAttention-3 recipe.

Shape of the kernel. One CTA per (query block of `block_q` = 2 x 64 rows, query head, batch)
runs three warpgroups:
  - a memory warpgroup that issues TMA copies of the k/v tiles the CTA visits into a ring of
    `stages` shared-memory slots, waiting on a per-slot "consumed" barrier before it reuses one;
  - two compute warpgroups, each owning 64 query rows (q stays in shared memory, the float32
    accumulator in registers). Per key tile: S = Q K^T by wgmma, an online softmax in float32
    (exp2 of the scores times scale * log2 e; on full tiles that multiply is folded into exp2's
    argument as one multiply-add), then O += P V by wgmma with P from registers. The two
    warpgroups take turns on the tensor cores through a shared "schedule" barrier, so one's
    softmax overlaps the other's matmuls (FA3's ping-pong).
Both compute warpgroups walk the same tile list, so every barrier sees the same number of
arrivals whatever the mask. Three variants of this loop (FWD_VARIANTS: hardware named barriers
for the schedule, the next k tile awaited during P V, the softmax pinned before the hand-off)
are switched on by EFFJAX_MOSAIC_GPU_FWD; they are off by default.

Tile lists. As in the Triton backend (gpu.py), `blocks` marks the [block_q, block_k] tiles with
at least one allowed (query, key) pair and only those are visited; they come in two runs, full
tiles (no token mask needed) then partial ones on a causal or window boundary (or every tile when
segment ids are given). One int32 table holds both runs per query block and two count vectors say
where each ends; the kernel reads them with scalar loads from global memory. For causal attention
the CTAs take query blocks from the last one down, so the longest rows start first.

Masks and empty rows follow reference.py: the running max starts at a finite -1e30 so a fully
masked tile contributes exact zeros, and a query with no allowed key writes out = 0 and
lse = EMPTY_ROW_LSE (natural-log units, float32 [B, Hq, S] like the Triton backend), which the
backward pass turns into zero gradients.

The backward pass (`bwd`, below) is two more warp-specialised kernels, dK/dV and dQ, consuming
(out, lse); at head dim 256 their warpgroups split the head dim (see the notes above `bwd`).
EFFJAX_MOSAIC_GPU_BWD_D256=triton sends that head dim to the Triton backward (gpu.bwd) instead.
"""

from __future__ import annotations

import functools
import inspect
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from effjax.kernels.flash_attention.layout import block_csr, retile, unmasked_blocks
from effjax.kernels.flash_attention.reference import EMPTY_ROW_LSE

_LOG2E = math.log2(math.e)
_M_INIT = -1e30
WG_ROWS = 64  # query rows per compute warpgroup: one wgmma M tile
COMPUTE_WGS = 2
BLOCK_Q = WG_ROWS * COMPUTE_WGS
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_SMEM_BYTES = 227 * 1024  # usable shared memory per CTA on Hopper
# Registers per thread after the warpgroups rebalance (setmaxnreg). The three warpgroups share the
# SM's 64K registers, 512 per thread slot across them, so 2 x compute + memory must not exceed
# 512 (240 + 240 + 40 would). 232 / 40 is the split JAX's own Hopper kernels use.
COMPUTE_REGISTERS, MEMORY_REGISTERS = 232, 40
assert COMPUTE_WGS * COMPUTE_REGISTERS + MEMORY_REGISTERS <= 512
# Full tiles fold the softmax scale into exp2's argument (see fwd's step). False restores the
# separate scaling, for experiments/attention_kernels/fwd_sweep.py to compare the two.
FOLD_SCALE = True

# Variants of the forward's main loop, off by default until a GPU run shows them faster (set
# EFFJAX_MOSAIC_GPU_FWD to a comma-separated list of them, or '' for none; read at trace time):
#   named_schedule  the two compute warpgroups hand the tensor cores to each other through two
#                   hardware named barriers (bar.arrive / bar.sync) instead of an mbarrier both
#                   arrive on and wait for: one signal and one wait a step per warpgroup, no
#                   shared-memory atomics.
#   wait_k_in_pv    the wait for the next k tile is issued while this tile's P V product runs
#                   on the tensor cores, instead of at the top of the next step.
#   order_softmax   the softmax's results (p, the rescaled accumulator, l, m) are pinned by an
#                   optimization barrier before the waits that precede this tile's P V (the
#                   v tile's and the schedule's), so none of that arithmetic is scheduled
#                   after them.
#   overlap_qk      FlashAttention-3's intra-warpgroup overlap: each step issues the next
#                   tile's Q K^T before this tile's softmax, so the softmax runs on the CUDA
#                   cores while that product runs on the tensor cores (the loop carries the
#                   next tile's scores; a prologue computes the first). Two score tiles are
#                   live at once, so it needs the registers for both: at D128 (block_k 128)
#                   64 + 64 a thread beside the accumulator's 64 and p's 32 in bf16, tight
#                   under COMPUTE_REGISTERS; at D64 default_blocks then takes 128-key tiles
#                   (256 would not fit). With order_softmax, the softmax is pinned before the
#                   product is awaited. It places the k waits itself, so it does not combine
#                   with wait_k_in_pv. The last step's look-ahead product reads a slot no tile
#                   fills and is discarded.
FWD_VARIANTS = ('named_schedule', 'wait_k_in_pv', 'order_softmax', 'overlap_qk')
_FWD_ENV = 'EFFJAX_MOSAIC_GPU_FWD'
# Named barrier ids the forward's schedule takes: Mosaic GPU keeps 0 (the CTA barrier) and 1-3
# (one per warpgroup of this kernel) for itself.
_SCHEDULE_BARRIER = 4


def fwd_variants() -> frozenset:
  """The forward variants EFFJAX_MOSAIC_GPU_FWD turns on (FWD_VARIANTS; empty by default)."""
  text = os.environ.get(_FWD_ENV, '')
  chosen = frozenset(v.strip() for v in text.split(',') if v.strip())
  unknown = sorted(chosen - set(FWD_VARIANTS))
  if unknown:
    raise ValueError(f'{_FWD_ENV}={text!r}: unknown {unknown}; allowed: '
                     f'{", ".join(FWD_VARIANTS)} (comma-separated, or empty for none)')
  if {'overlap_qk', 'wait_k_in_pv'} <= chosen:
    raise ValueError(f'{_FWD_ENV}={text!r}: overlap_qk places the k waits itself; it does not '
                     f'combine with wait_k_in_pv')
  return chosen


def _ptx(text: str, *operands) -> None:
  """One side-effecting PTX statement (operands: 32-bit registers, as $0, $1, ...)."""
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  if hasattr(mgpu_utils, 'inline_ptx'):  # JAX >= 0.11: barriers marked convergent
    extra = {'convergent': True} if 'convergent' in inspect.signature(
        mgpu_utils.inline_ptx).parameters else {}
    mgpu_utils.inline_ptx(text, *operands, has_side_effects=True, **extra)
    return
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import llvm
  llvm.inline_asm(ir.Type.parse('!llvm.void'), list(operands), text,
                  ','.join('r' for _ in operands), has_side_effects=True)


def named_barrier(operation: str, barrier_id, num_threads: int) -> None:
  """PTX bar.arrive (operation 'arrive': count this warpgroup in, do not wait) or bar.sync
  ('sync': count in and wait) on hardware barrier `barrier_id` (a Python int or an int32 scalar
  uniform across the warpgroup) that completes when `num_threads` threads have reached it.

  The nested function's name and closure (bar_op; operation, num_threads, barrier_id) are what
  JAX 0.11's GPU interpreter recognises to model a named barrier (interpret mode, below)."""
  if operation not in ('arrive', 'sync'):
    raise ValueError(f"named barrier operation {operation!r}: must be 'arrive' or 'sync'")
  if isinstance(barrier_id, int):
    @plgpu.inline_mgpu()
    def bar_op(_):
      _ptx(f'bar.{operation} {barrier_id}, {num_threads};')
    bar_op()
  else:
    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WG_SPLAT,))
    def bar_op(_, barrier_id):
      _ptx(f'bar.{operation} $0, {num_threads};', barrier_id.registers[()])
    bar_op(barrier_id)


def default_blocks(head_dim: int) -> tuple[int, int]:
  """(block_q, block_k): 128 query rows per CTA; k/v tiles sized so the ring fits in SMEM.

  Head dim 64 takes 256-key tiles (three ring slots; 128 with the overlap_qk variant, which holds
  two score tiles in registers): with half the matmul work of head dim 128
  per tile, a longer tile presumably pays its per-tile costs (barriers, the accumulator's
  rescaling) over twice the keys; that reading was not profiled. On an H100
  (experiments/attention_kernels/fwd_sweep.py, causal, one run) it was 0.99x / 1.07x cuDNN at
  S 4k / 16k against 0.93x / 1.01x with 128-key tiles. Head dim 128 keeps 128 (256 does not
  fit two slots), 256 takes 64."""
  if head_dim == 64:  # overlap_qk holds two score tiles: 256 keys would not fit the registers
    return BLOCK_Q, 128 if 'overlap_qk' in fwd_variants() else 256
  return BLOCK_Q, 128 if head_dim <= 128 else 64


def default_stages(head_dim: int, block_k: int, itemsize: int = 2) -> int:
  """Ring depth: as many k/v slots as fit beside q (at most 4; at least 2)."""
  q_bytes = BLOCK_Q * head_dim * itemsize
  slot_bytes = 2 * block_k * head_dim * itemsize
  return int(max(2, min(4, (_SMEM_BYTES - q_bytes - 4096) // slot_bytes)))


def tile_tables(blocks: np.ndarray, seq_len: int, block_q: int, block_k: int, *, causal: bool,
                window: int | None, has_segments: bool, by_key: bool = False):
  """(idx int32 [rows, width], n_full int32 [rows], n_total int32 [rows]) in visiting order.

  `blocks` is the [S/block_q, S/block_k] tile mask. Rows are query blocks listing key blocks,
  or with by_key=True key blocks listing query blocks. Row r lists its full tiles first
  (idx[r, :n_full[r]]), then its partial ones (idx[r, n_full[r]:n_total[r]]).
  """
  blocks = np.asarray(blocks, dtype=bool)
  if has_segments:
    full = np.zeros_like(blocks)
  else:
    full = blocks & unmasked_blocks(seq_len, block_q, block_k, causal=causal, window=window)
  if by_key:
    blocks, full = blocks.T, full.T
  partial = blocks & ~full
  full_idx, full_cnt = block_csr(full)
  part_idx, part_cnt = block_csr(partial)
  rows = blocks.shape[0]
  width = max(int((full_cnt + part_cnt).max(initial=0)), 1)
  idx = np.zeros((rows, width), dtype=np.int32)
  for r in range(rows):
    nf, npart = int(full_cnt[r]), int(part_cnt[r])
    idx[r, :nf] = full_idx[r, :nf]
    idx[r, nf:nf + npart] = part_idx[r, :npart]
  return idx, full_cnt.astype(np.int32), (full_cnt + part_cnt).astype(np.int32)


def _transpose(ref):
  """The [rows, cols] -> [cols, rows] view of an SMEM ref, for wgmma's B operand."""
  if hasattr(ref, 'transpose'):
    return ref.transpose((1, 0))
  return plgpu.transpose_ref(ref, (1, 0))  # JAX < 0.11


def _load(ref, layout):
  """A register array in `layout` from an SMEM ref (JAX < 0.11 takes the index separately)."""
  if 'idx' in inspect.signature(plgpu.load).parameters and inspect.signature(
      plgpu.load).parameters['idx'].default is inspect.Parameter.empty:
    return plgpu.load(ref, (), layout=layout)
  return plgpu.load(ref, layout=layout)


def _layout(x, to, *, interpret):
  """x in register layout `to` (the interpreter has no register layouts: x unchanged)."""
  return x if interpret is not None else plgpu.layout_cast(x, to)


def _accumulate(acc, a, b_ref, a_staging=None, while_running=None):
  """acc + a @ b by wgmma, accumulating in place in the registers holding acc.

  `while_running()`, if given, is called after the product is issued and before it is awaited
  (work that overlaps the tensor cores' run).

  Interpret mode passes `a_staging`, an SMEM ref for `a`: the interpreter takes wgmma operands
  from shared memory only and cannot run `pl.run_state`, so there the product goes through SMEM
  into a fresh accumulator and is added. Both compute the same sum.
  """
  if a_staging is not None:
    a_staging[...] = a
    plgpu.commit_smem()

    def product(acc_ref):
      plgpu.wgmma(acc_ref, a_staging, b_ref)
      if while_running is not None:
        while_running()
      return acc_ref[...]
    return acc + pl.run_scoped(product, plgpu.ACC(acc.shape, jnp.float32))

  def accumulate(acc_ref):
    plgpu.wgmma(acc_ref, a, b_ref)
    if while_running is not None:
      while_running()

  return pl.run_state(accumulate)(plgpu.ACC.init(acc))


# The value of the GPU interpreter's `inline_mgpu` parameter under which it models named
# barriers (bar.arrive / bar.sync written as `named_barrier` writes them); JAX 0.11.
_INTERPRET_NAMED_BARRIERS = '_hack_model_inline_mgpu_tokamax'


def _interpret_params(interpret, named_barriers: bool = False):
  """None (compile for the GPU) or the GPU interpreter's parameters (True picks defaults).

  named_barriers: the kernel uses `named_barrier`, which the interpreter runs only in the mode
  that models it (JAX 0.11's; an older interpreter is told so in one error). Parameters passed
  in are used as they are: with named barriers they need inline_mgpu=_INTERPRET_NAMED_BARRIERS."""
  if not interpret:
    return None
  if interpret is not True:
    return interpret
  params = getattr(plgpu, 'InterpretGPUParams', None)
  if params is None:  # JAX < 0.11 keeps it private
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
  if not named_barriers:
    return params()
  if 'inline_mgpu' not in inspect.signature(params).parameters:
    raise NotImplementedError(
        f'the forward variant named_schedule ({_FWD_ENV}) uses hardware named barriers, which '
        f'this JAX version\'s GPU interpreter cannot run (JAX 0.11 can)')
  return params(inline_mgpu=_INTERPRET_NAMED_BARRIERS)


def _launch(kernel, out_type, grid, grid_names, interpret):
  """A kernel of COMPUTE_WGS compute warpgroups and one memory warpgroup (axis 'wg')."""
  return plgpu.kernel(kernel, out_type=out_type, grid=grid, grid_names=grid_names,
                      num_threads=COMPUTE_WGS + 1, thread_name='wg',
                      compiler_params=plgpu.CompilerParams(approx_math=True),
                      interpret=interpret)


def fwd(q, k, v, segment_ids, *, causal: bool, window: int | None, blocks: np.ndarray,
        scale: float, block_q: int, block_k: int, interpret=False, stages: int | None = None):
  """(out [B, S, Hq, D] in q.dtype, lse float32 [B, Hq, S]) visiting only the `blocks` tiles."""
  b, s, hq, d = q.shape
  hkv = k.shape[2]
  groups = hq // hkv
  dtype = q.dtype
  if block_q != BLOCK_Q:
    raise ValueError(f'the Mosaic GPU kernel runs block_q={BLOCK_Q} (two warpgroups of '
                     f'{WG_ROWS} rows), got block_q={block_q}')
  if block_k % 64 or block_k > 256 or s % block_k:
    raise ValueError(f'block_k={block_k} must be a multiple of 64, at most 256 (the largest '
                     f'wgmma N and TMA box), dividing S={s}')
  if jnp.dtype(dtype) not in DTYPES:
    raise ValueError(f'the Mosaic GPU kernel takes bfloat16 or float16, got {dtype}')
  has_segments = segment_ids is not None
  idx, n_full, n_total = tile_tables(blocks, s, block_q, block_k, causal=causal, window=window,
                                     has_segments=has_segments)
  num_q_blocks = s // block_q
  stages = default_stages(d, block_k, jnp.dtype(dtype).itemsize) if stages is None else stages
  max_steps = int(n_total.max(initial=0))
  stages = max(1, min(stages, max_steps)) if max_steps else 1
  if stages < 2 and max_steps >= 2:
    # One slot deadlocks the ping-pong: warpgroup 1's P V waits for warpgroup 0's next Q K^T,
    # which needs the next k tile, which needs the slot warpgroup 1 has not released.
    raise ValueError(f'stages={stages}: the forward needs at least 2 k/v slots')
  ring = (BLOCK_Q * d + 2 * stages * block_k * d) * jnp.dtype(dtype).itemsize
  if ring > _SMEM_BYTES:
    raise ValueError(f'block_k={block_k} with head dim {d}: {stages} k/v slots and q need '
                     f'{ring // 1024} KiB of shared memory, more than the {_SMEM_BYTES // 1024} '
                     f'KiB a CTA has; use a smaller block_k')
  qk_scale = scale * _LOG2E
  variants = fwd_variants()
  named = 'named_schedule' in variants
  wait_k_in_pv = 'wait_k_in_pv' in variants
  order_softmax = 'order_softmax' in variants
  overlap_qk = 'overlap_qk' in variants
  interpret = _interpret_params(interpret, named_barriers=named)

  layout = functools.partial(_layout, interpret=interpret)

  def compute_wg(wg, qb, batch, head, refs, scratch):
    q_ref, idx_ref, nfull_ref, ntotal_ref, seg_ref, out_ref, lse_ref = refs
    (qo_smem, k_smem, v_smem, lse_smem, segq_smem, segk_smem, p_smem, k_ready, v_ready,
     q_ready, k_free, v_free, schedule) = scratch
    plgpu.set_max_registers(COMPUTE_REGISTERS, action='increase')
    q_tile = qo_smem.at[wg]
    row0 = qb * block_q + wg * WG_ROWS
    plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(row0, WG_ROWS), head], q_tile, q_ready.at[wg])
    if has_segments:
      plgpu.copy_gmem_to_smem(seg_ref.at[batch, pl.ds(row0, WG_ROWS)], segq_smem.at[wg],
                              q_ready.at[wg])
    plgpu.barrier_wait(q_ready.at[wg])
    seg_q = None
    if has_segments:
      seg_q = _load(segq_smem.at[wg], plgpu.Layout.WGMMA.reduce(1))
    n_f = nfull_ref[qb]
    n_t = ntotal_ref[qb]

    # Taking turns on the tensor cores. With the mbarrier `schedule` both warpgroups meet twice a
    # step: after issuing Q K^T (sync_tensor_cores) and around the softmax's end (take_turn). With named barriers (named_schedule) warpgroup w signals the other on barrier
    # 4 + (1 - w) after issuing Q K^T and waits on barrier 4 + w for the other's signal before
    # its P V: each waits only for the other to have issued its own Q K^T.
    if named:
      def signal_other():
        named_barrier('arrive', _SCHEDULE_BARRIER + 1 - wg, 2 * 128)

      def wait_other():
        named_barrier('sync', _SCHEDULE_BARRIER + wg, 2 * 128)

    def sync_tensor_cores():
      if named:
        signal_other()
      else:
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(schedule)

    def take_turn(slot):
      """Hand the tensor cores over after the softmax and wait until they are ours again."""
      if named:
        plgpu.barrier_wait(v_ready.at[slot])
        wait_other()
      else:
        plgpu.barrier_arrive(schedule)  # softmax done: the other warpgroup may issue
        plgpu.barrier_wait(v_ready.at[slot])
        plgpu.barrier_wait(schedule)  # the tensor cores are ours again

    def softmax(t, scores, seg_k, carry, masked):
      """This tile's online softmax: (acc rescaled, p in the input dtype, new row max, l)."""
      acc, m, l = carry
      if masked or not FOLD_SCALE:
        scores = scores * qk_scale
        if masked:
          scores = _mask_tile(scores, row0, idx_ref[qb, t] * block_k, seg_q, seg_k,
                              keys_on_rows=False, causal=causal, window=window, layout=layout)
        m_new = jnp.maximum(m, scores.max(axis=1))
        p = jnp.exp2(scores - lax.broadcast_in_dim(m_new, scores.shape, [0]))
      else:
        # A full tile: the scale goes into the exponent's argument, one fused multiply-add an
        # entry, and the row max is taken unscaled (scaling by a positive constant commutes with
        # max and with rounding), instead of a multiply, then a subtract.
        m_new = jnp.maximum(m, scores.max(axis=1) * qk_scale)
        p = jnp.exp2(scores * qk_scale - lax.broadcast_in_dim(m_new, scores.shape, [0]))
      alpha = jnp.exp2(m - m_new)
      l = l * alpha + p.sum(axis=1)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      return acc, p.astype(dtype), m_new, l

    def load_seg_k(slot):
      return _load(segk_smem.at[slot], plgpu.Layout.WGMMA.reduce(0)) if has_segments else None

    def step(t, carry, masked):
      acc, m, l = carry
      slot = lax.rem(t, stages)
      if not wait_k_in_pv:
        plgpu.barrier_wait(k_ready.at[slot])

      def qk(acc_ref):
        plgpu.wgmma(acc_ref, q_tile, _transpose(k_smem.at[slot]))
        sync_tensor_cores()
        return acc_ref[...]

      scores = pl.run_scoped(qk, plgpu.ACC((WG_ROWS, block_k), jnp.float32))
      # The keys' segment ids share the k slot (load_k copies both): read them before the slot
      # is released, or the memory warpgroup may already be refilling it with a later tile's.
      seg_k = load_seg_k(slot) if masked else None
      plgpu.barrier_arrive(k_free.at[slot])
      acc, p, m_new, l = softmax(t, scores, seg_k, (acc, m, l), masked)
      if order_softmax:
        acc, p, l, m_new = lax.optimization_barrier((acc, p, l, m_new))
      take_turn(slot)

      def wait_next_k():  # the next step's k tile, awaited while P V runs
        @pl.when(t + 1 < n_t)
        def _():
          plgpu.barrier_wait(k_ready.at[lax.rem(t + 1, stages)])

      acc = _accumulate(acc, p, v_smem.at[slot], None if p_smem is None else p_smem.at[wg],
                        while_running=wait_next_k if wait_k_in_pv else None)
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m_new, l

    def look_ahead(t):
      """The scores of tile t (and its keys' segment ids) by wgmma, its k slot then released;
      with no tile t (t == n_t) the product runs on a slot nothing fills and is discarded."""
      slot = lax.rem(t, stages)
      there = t < n_t

      @pl.when(there)
      def _():
        plgpu.barrier_wait(k_ready.at[slot])

      def qk(acc_ref):
        plgpu.wgmma(acc_ref, q_tile, _transpose(k_smem.at[slot]))
        return acc_ref[...]

      scores = pl.run_scoped(qk, plgpu.ACC((WG_ROWS, block_k), jnp.float32))
      seg_k = load_seg_k(slot)

      @pl.when(there)
      def _():
        plgpu.barrier_arrive(k_free.at[slot])

      return scores, seg_k

    def step_overlapped(t, carry, masked):
      """overlap_qk: carry holds tile t's scores; tile t + 1's Q K^T is issued, then tile t's
      softmax runs while it is on the tensor cores, then tile t's P V."""
      acc, m, l, scores, seg_k = carry
      slot, nxt = lax.rem(t, stages), lax.rem(t + 1, stages)
      there = t + 1 < n_t

      @pl.when(there)
      def _():
        plgpu.barrier_wait(k_ready.at[nxt])

      def overlapped(acc_ref):
        plgpu.wgmma(acc_ref, q_tile, _transpose(k_smem.at[nxt]))
        sync_tensor_cores()
        out = softmax(t, scores, seg_k, (acc, m, l), masked)
        if order_softmax:  # the softmax pinned before the product is awaited
          out = lax.optimization_barrier(out)
        return (acc_ref[...], *out)

      scores_next, acc, p, m_new, l = pl.run_scoped(
          overlapped, plgpu.ACC((WG_ROWS, block_k), jnp.float32))
      seg_next = load_seg_k(nxt)  # before the slot is released (see step)

      @pl.when(there)
      def _():
        plgpu.barrier_arrive(k_free.at[nxt])

      take_turn(slot)
      acc = _accumulate(acc, p, v_smem.at[slot], None if p_smem is None else p_smem.at[wg])
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m_new, l, scores_next, seg_next

    acc = layout(jnp.zeros((WG_ROWS, d), jnp.float32), plgpu.Layout.WGMMA)
    m = layout(jnp.full((WG_ROWS,), _M_INIT, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    l = layout(jnp.zeros((WG_ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    # Warpgroup 1 starts one turn behind so the two alternate on the tensor cores.
    pl.when(wg == 1)(wait_other if named else sync_tensor_cores)
    if wait_k_in_pv:  # the first k tile; each step then awaits the next one during its P V
      @pl.when(n_t > 0)
      def _():
        plgpu.barrier_wait(k_ready.at[0])
    if overlap_qk:
      carry = (acc, m, l, *look_ahead(0))
      carry = lax.fori_loop(0, n_f, functools.partial(step_overlapped, masked=False), carry)
      acc, m, l, _, _ = lax.fori_loop(n_f, n_t, functools.partial(step_overlapped, masked=True),
                                      carry)
    else:
      carry = lax.fori_loop(0, n_f, functools.partial(step, masked=False), (acc, m, l))
      acc, m, l = lax.fori_loop(n_f, n_t, functools.partial(step, masked=True), carry)
    # Warpgroup 0 releases warpgroup 1's last wait (with named barriers: the one before its last
    # P V, or its first if there were no tiles; every signal then has its wait).
    pl.when(wg == 0)(signal_other if named else sync_tensor_cores)

    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    out = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
    q_tile[...] = out.astype(dtype)
    lse_smem.at[wg][...] = jnp.where(empty, EMPTY_ROW_LSE, (m + jnp.log2(l_safe)) / _LOG2E)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_tile, out_ref.at[batch, pl.ds(row0, WG_ROWS), head])
    plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[batch, head, pl.ds(row0, WG_ROWS)])
    plgpu.wait_smem_to_gmem(0)

  def memory_wg(qb, batch, head, refs, scratch):
    k_ref, v_ref, idx_ref, ntotal_ref, seg_ref = refs
    (_, k_smem, v_smem, _, _, segk_smem, _, k_ready, v_ready, _, k_free, v_free, _) = scratch
    plgpu.set_max_registers(MEMORY_REGISTERS, action='decrease')
    kv_head = lax.div(head, groups)
    n_t = ntotal_ref[qb]

    def load_k(t, slot):
      rows = pl.ds(idx_ref[qb, t] * block_k, block_k)
      plgpu.copy_gmem_to_smem(k_ref.at[batch, rows, kv_head], k_smem.at[slot], k_ready.at[slot])
      if has_segments:
        plgpu.copy_gmem_to_smem(seg_ref.at[batch, rows], segk_smem.at[slot], k_ready.at[slot])

    def load_v(t, slot):
      rows = pl.ds(idx_ref[qb, t] * block_k, block_k)
      plgpu.copy_gmem_to_smem(v_ref.at[batch, rows, kv_head], v_smem.at[slot], v_ready.at[slot])

    _produce(n_t, stages, ((k_free, load_k), (v_free, load_v)))

  def kernel(q_ref, k_ref, v_ref, idx_ref, nfull_ref, ntotal_ref, *rest):
    seg_ref, out_ref, lse_ref = rest if has_segments else (None, *rest)
    wg = lax.axis_index('wg')
    head = lax.axis_index('heads')
    batch = lax.axis_index('batch')
    qb = lax.axis_index('q')
    if causal:
      qb = num_q_blocks - 1 - qb  # longest rows first

    def body(*scratch):
      @pl.when(wg < COMPUTE_WGS)
      def _():
        compute_wg(wg, qb, batch, head,
                   (q_ref, idx_ref, nfull_ref, ntotal_ref, seg_ref, out_ref, lse_ref), scratch)

      @pl.when(wg == COMPUTE_WGS)
      def _():
        memory_wg(qb, batch, head, (k_ref, v_ref, idx_ref, ntotal_ref, seg_ref), scratch)

    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    seg_scratch = [plgpu.SMEM((COMPUTE_WGS, WG_ROWS), jnp.int32),
                   plgpu.SMEM((stages, block_k), jnp.int32)] if has_segments else [None, None]
    pl.run_scoped(
        body,
        plgpu.SMEM((COMPUTE_WGS, WG_ROWS, d), dtype, transforms=swizzled),
        plgpu.SMEM((stages, block_k, d), dtype, transforms=swizzled),
        plgpu.SMEM((stages, block_k, d), dtype, transforms=swizzled),
        plgpu.SMEM((COMPUTE_WGS, WG_ROWS), jnp.float32),
        *seg_scratch,
        plgpu.SMEM((COMPUTE_WGS, WG_ROWS, block_k), dtype, transforms=swizzled)
        if interpret else None,
        # k_ready counts the k copy and (with segment ids) the segment copy: both arrive.
        plgpu.Barrier(num_arrivals=2 if has_segments else 1, num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_arrivals=2 if has_segments else 1, num_barriers=COMPUTE_WGS),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
        None if named else plgpu.Barrier(num_arrivals=COMPUTE_WGS),  # schedule
        collective_axes='wg',
    )

  inputs = [q, k, v, jnp.asarray(idx), jnp.asarray(n_full), jnp.asarray(n_total)]
  if has_segments:
    inputs.append(segment_ids.astype(jnp.int32))
  out_type = (jax.ShapeDtypeStruct(q.shape, dtype),
              jax.ShapeDtypeStruct((b, hq, s), jnp.float32))
  out, lse = _launch(kernel, out_type, (hq, num_q_blocks, b), ('heads', 'q', 'batch'),
                     interpret)(*inputs)
  return out, lse


# ----------------------------------------------------------------------------------------------
# Backward: a dK/dV kernel and a dQ kernel, both warp-specialised like the forward.
#
# dK/dV: one CTA per (128 keys = two warpgroups of 64, kv head, batch). Each compute warpgroup
# keeps its 64 rows of K and V in shared memory and dK, dV in float32 registers, and walks the
# query tiles (64 rows) that see its keys, for every query head of its GQA group, so dK and dV
# come out summed over the group with no second pass. Per query tile, with keys as rows:
#   S^T = K Q^T, P^T = exp2(S^T * scale log2 e - lse log2 e), dP^T = V dO^T,
#   dV += P^T dO, dS^T = P^T (dP^T - delta), dK += dS^T Q          (four wgmma)
# dQ: one CTA per (128 queries, query head, batch) walking the forward's key tiles (64 wide):
#   S = Q K^T, dP = dO V^T, dS = P (dP - delta), dQ += dS K        (three wgmma)
# Splitting dQ off costs recomputing S and dP (seven matmuls instead of five) but needs no
# atomic accumulation across CTAs, so results are deterministic. A memory warpgroup streams the
# tiles into a ring of `stages` slots as in the forward.
#
# Head dim 256. Accumulating dK and dV of 64 x 256 in one warpgroup would take 256 float32
# registers a thread for them alone, beyond Hopper's 255. So at D = 256 the two compute
# warpgroups share one 64-row tile and split the head dim instead of the rows: every D-sized
# tile sits in shared memory as two 128-wide parts, S^T (S) and dP^T (dP) contract both parts
# (two wgmma into one accumulator, computed by both warpgroups), and warpgroup w accumulates
# and writes only part w of dK and dV (dQ): the registers and wgmma shapes of the D = 128
# kernel, at 1.5x its tensor-core work per key tile (the scores are formed twice). CTAs cover 64
# rows, so twice as many run. Measured on an H100 (B2 S4096 H8 D256 causal, fwd+bwd): 268
# TFLOP/s against the Triton backward's 189 and cuDNN's 296. EFFJAX_MOSAIC_GPU_BWD_D256=triton
# takes the Triton backward at this head dim instead (head_dim_256_backward).

BWD_TILE = 64  # rows of the streamed tile in both backward kernels
BWD_PART = 128  # head-dim columns a backward warpgroup accumulates, at most
_BWD_D256_ENV = 'EFFJAX_MOSAIC_GPU_BWD_D256'


def head_dim_256_backward() -> str:
  """Which backward a head dim above 128 takes: 'mosaic_gpu' (default) or 'triton'."""
  choice = os.environ.get(_BWD_D256_ENV, 'mosaic_gpu')
  if choice not in ('triton', 'mosaic_gpu'):
    raise ValueError(f"{_BWD_D256_ENV}={choice!r}: must be 'triton' or 'mosaic_gpu'")
  return choice


def head_dim_parts(head_dim: int) -> int:
  """Parts the backward splits the head dim into across its compute warpgroups (1 or 2)."""
  parts = max(1, head_dim // BWD_PART)
  if head_dim % parts or head_dim // parts > BWD_PART or COMPUTE_WGS % parts:
    raise ValueError(f'the Mosaic GPU backward takes head dims 64, 128 or 256, got {head_dim}')
  return parts


def _wg_part(wg, parts: int):
  """(row group, head-dim part) of compute warpgroup wg when the head dim is in `parts` parts."""
  if parts == 1:
    return wg, 0
  return lax.div(wg, parts), lax.rem(wg, parts)


def _head_cols(part, width: int, parts: int) -> tuple:
  """The trailing index of a [B, S, H, D] ref selecting head-dim part `part` (none if whole)."""
  return () if parts == 1 else (pl.ds(part * width, width),)


def _parted(lead: tuple, parts: int, tail: tuple) -> tuple:
  """A backward SMEM shape: the leading dims, the head-dim part axis where there are parts."""
  return lead + ((parts,) if parts > 1 else ()) + tail


def _at(ref, index, part, parts: int):
  """ref.at[index] and, where the head dim is in parts, that part. A whole head dim adds no
  index: a literal one would be captured as a constant by pl.run_state, which Mosaic GPU's
  lowering cannot pass through."""
  return ref.at[index] if parts == 1 else ref.at[index + (part,)]


def _copy_parts(pairs, index: tuple, slot, barrier, width: int, parts: int) -> None:
  """TMA copies of rows `index` of each (gmem [B, S, H, D] ref, SMEM ring) pair into ring slot
  `slot`, one copy per head-dim part, all arriving on `barrier`."""
  for h in range(parts):
    for src, ring in pairs:
      plgpu.copy_gmem_to_smem(src.at[index + _head_cols(h, width, parts)],
                              _at(ring, (slot,), h, parts), barrier)


def _first_part(part, fn) -> None:
  """fn() in the warpgroup holding part 0 of its row group (the one loading per-row data)."""
  if isinstance(part, int):
    if part == 0:
      fn()
  else:
    pl.when(part == 0)(fn)


def bwd_stages(head_dim: int, resident_bytes: int, slot_bytes: int) -> int:
  """Ring depth of a backward kernel: slots that fit beside its resident tiles (1 to 4)."""
  return int(max(1, min(4, (_SMEM_BYTES - resident_bytes - 8192) // slot_bytes)))


def _produce(n_steps, stages: int, parts) -> None:
  """The memory warpgroup's loop over steps t < n_steps in a ring of `stages` slots. `parts` are
  (free, issue) pairs, one per tensor (or group of tensors) of a slot: issue(t, slot) starts its
  copies once `free` says the consumers released that part of the slot, so a part released early
  (K after the scores, before V's product) is refilled without waiting for the others."""
  for t in range(stages):
    for _, issue in parts:
      pl.when(t < n_steps)(functools.partial(issue, t, t))

  @pl.loop(stages, n_steps)
  def _(t):
    slot = lax.rem(t, stages)
    for free, issue in parts:
      plgpu.barrier_wait(free.at[slot])
      issue(t, slot)

  # Observe the last release of every slot, so no barrier is freed with a phase pending.
  @pl.loop(lax.max(n_steps - stages, 0), n_steps)
  def _(t):
    for free, _ in parts:
      plgpu.barrier_wait(free.at[lax.rem(t, stages)])


def _allowed(q_ids, k_ids, *, causal: bool, window: int | None):
  """Causal and window rules on broadcast query and key positions (None: no rule applies)."""
  ok = None
  if causal:
    ok = k_ids <= q_ids
  if window is not None:
    near = q_ids - k_ids < window
    if not causal:
      near = near & (k_ids - q_ids < window)
    ok = near if ok is None else ok & near
  return ok


def _mask_tile(scores, row0, col0, seg_rows, seg_cols, *, keys_on_rows: bool, causal: bool,
               window: int | None, layout):
  """-inf where a (WG_ROWS, n) WGMMA tile's entry is masked. Rows start at position row0 and
  columns at col0; rows are queries and columns keys (forward, dQ) or the reverse (dK/dV, which
  multiply K by Q^T). seg_rows / seg_cols: the rows' and columns' segment ids (None: no segments;
  a key of segment 0 is padding)."""
  shape = scores.shape
  rows = row0 + layout(lax.broadcasted_iota(jnp.int32, shape, 0), plgpu.Layout.WGMMA)
  cols = col0 + layout(lax.broadcasted_iota(jnp.int32, shape, 1), plgpu.Layout.WGMMA)
  q_ids, k_ids = (cols, rows) if keys_on_rows else (rows, cols)
  ok = _allowed(q_ids, k_ids, causal=causal, window=window)
  if seg_rows is not None:
    seg_r = lax.broadcast_in_dim(seg_rows, shape, [0])
    seg_c = lax.broadcast_in_dim(seg_cols, shape, [1])
    same = (seg_r == seg_c) & ((seg_r if keys_on_rows else seg_c) > 0)
    ok = same if ok is None else ok & same
  return scores if ok is None else jnp.where(ok, scores, -jnp.inf)


def bwd(q, k, v, segment_ids, out, lse, d_out, *, causal: bool, window: int | None,
        blocks: np.ndarray, scale: float, block_q: int, block_k: int, interpret=False,
        stages: int | None = None):
  """(dq, dk, dv) in the input dtypes, dk and dv summed over each kv head's query group.

  `blocks` is the forward's tile mask at (block_q, block_k); lse the forward's float32
  [B, Hq, S] (EMPTY_ROW_LSE on keyless rows, whose gradients come out zero).
  """
  b, s, hq, d = q.shape
  if d > 128 and head_dim_256_backward() == 'triton':
    from effjax.kernels.flash_attention import gpu
    return gpu.bwd(q, k, v, segment_ids, out, lse, d_out, causal=causal, window=window,
                   blocks=blocks, scale=scale, block_q=block_q, block_k=block_k,
                   interpret=bool(interpret))
  halves = head_dim_parts(d)
  cta_rows = WG_ROWS * (COMPUTE_WGS // halves)
  dtype = q.dtype
  has_segments = segment_ids is not None
  interpret = _interpret_params(interpret)
  delta = jnp.einsum('bshd,bshd->bhs', out.astype(jnp.float32), d_out.astype(jnp.float32))
  lse2 = lse * _LOG2E
  d_out = d_out.astype(dtype)
  segments = [segment_ids.astype(jnp.int32)] if has_segments else []
  common = dict(causal=causal, window=window, scale=scale, has_segments=has_segments,
                interpret=interpret, stages=stages)
  kv_blocks = retile(blocks, s, block_q, block_k, BWD_TILE, cta_rows, causal=causal,
                     window=window)
  dk, dv = _dkv_call(q, k, v, d_out, lse2, delta, segments, kv_blocks, **common)
  q_blocks = retile(blocks, s, block_q, block_k, cta_rows, BWD_TILE, causal=causal,
                    window=window)
  dq = _dq_call(q, k, v, d_out, lse2, delta, segments, q_blocks, **common)
  return dq, dk, dv


def _swizzled_smem(shape, dtype):
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)),
                                              plgpu.SwizzleTransform(128)))


def _dkv_call(q, k, v, d_out, lse2, delta, segments, blocks, *, causal, window, scale,
              has_segments, interpret, stages):
  """dK, dV: CTAs over (kv heads, key blocks of WG_ROWS x row groups, batch)."""
  b, s, hq, d = q.shape
  hkv = k.shape[2]
  groups = hq // hkv
  dtype = q.dtype
  itemsize = jnp.dtype(dtype).itemsize
  bq = BWD_TILE
  halves = head_dim_parts(d)
  row_wgs = COMPUTE_WGS // halves
  cta_rows, dh = WG_ROWS * row_wgs, d // halves
  idx, n_full, n_total = tile_tables(blocks, s, bq, cta_rows, causal=causal, window=window,
                                     has_segments=has_segments, by_key=True)
  stages = bwd_stages(d, 2 * cta_rows * d * itemsize, 2 * bq * d * itemsize + 3 * bq * 4) \
      if stages is None else stages
  max_steps = groups * int(n_total.max(initial=0))
  stages = max(1, min(stages, max_steps)) if max_steps else 1
  qk_scale = scale * _LOG2E
  lay = functools.partial(_layout, interpret=interpret)

  def compute_wg(wg, kb, batch, kv_head, refs, scratch):
    k_ref, v_ref, idx_ref, nfull_ref, ntotal_ref, seg_ref, dk_ref, dv_ref = refs
    (k_own, v_own, segk_own, q_smem, do_smem, lse_smem, delta_smem, segq_smem, staging,
     own_ready, ready, free, done) = scratch
    plgpu.set_max_registers(COMPUTE_REGISTERS, action='increase')
    rw, hf = _wg_part(wg, halves)
    row0 = kb * cta_rows + rw * WG_ROWS
    rows = pl.ds(row0, WG_ROWS)
    at = lambda ref: ref.at[(batch, rows, kv_head) + _head_cols(hf, dh, halves)]
    # This warpgroup's part of its row group's K and V; the row group waits for all parts.
    plgpu.copy_gmem_to_smem(at(k_ref), _at(k_own, (rw,), hf, halves), own_ready.at[rw])
    plgpu.copy_gmem_to_smem(at(v_ref), _at(v_own, (rw,), hf, halves), own_ready.at[rw])
    if has_segments:
      _first_part(hf, lambda: plgpu.copy_gmem_to_smem(seg_ref.at[batch, rows], segk_own.at[rw],
                                                      own_ready.at[rw]))
    plgpu.barrier_wait(own_ready.at[rw])
    seg_k = _load(segk_own.at[rw], plgpu.Layout.WGMMA.reduce(1)) if has_segments else None
    n_f = nfull_ref[kb]
    n_t = ntotal_ref[kb]
    stage = None if staging is None else staging.at[wg]
    shape = (WG_ROWS, bq)

    def step(j, carry, base, masked):
      dk, dv = carry
      t = base + j
      slot = lax.rem(t, stages)
      plgpu.barrier_wait(ready.at[slot])

      def sT(acc_ref):  # contracts the whole head dim: every part of K and Q
        for h in range(halves):
          plgpu.wgmma(acc_ref, _at(k_own, (rw,), h, halves),
                      _transpose(_at(q_smem, (slot,), h, halves)))
        return acc_ref[...]

      def dpT(acc_ref):
        for h in range(halves):
          plgpu.wgmma(acc_ref, _at(v_own, (rw,), h, halves),
                      _transpose(_at(do_smem, (slot,), h, halves)))
        return acc_ref[...]

      scores = pl.run_scoped(sT, plgpu.ACC(shape, jnp.float32)) * qk_scale
      if masked:
        seg_q = _load(segq_smem.at[slot], plgpu.Layout.WGMMA.reduce(0)) if has_segments \
            else None
        scores = _mask_tile(scores, row0, idx_ref[kb, j] * bq, seg_k, seg_q,
                            keys_on_rows=True, causal=causal, window=window, layout=lay)
      lse_cols = _load(lse_smem.at[slot], plgpu.Layout.WGMMA.reduce(0))
      p_t = jnp.exp2(scores - lax.broadcast_in_dim(lse_cols, shape, [1]))
      dv = _accumulate(dv, p_t.astype(dtype), _at(do_smem, (slot,), hf, halves), stage)
      delta_cols = _load(delta_smem.at[slot], plgpu.Layout.WGMMA.reduce(0))
      dp_t = pl.run_scoped(dpT, plgpu.ACC(shape, jnp.float32))
      ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta_cols, shape, [1]))
      dk = _accumulate(dk, ds_t.astype(dtype), _at(q_smem, (slot,), hf, halves), stage)
      plgpu.barrier_arrive(free.at[slot])
      return dk, dv

    def per_head(g, carry):
      base = g * n_t
      carry = lax.fori_loop(0, n_f, functools.partial(step, base=base, masked=False), carry)
      return lax.fori_loop(n_f, n_t, functools.partial(step, base=base, masked=True), carry)

    zeros = lay(jnp.zeros((WG_ROWS, dh), jnp.float32), plgpu.Layout.WGMMA)
    dk, dv = lax.fori_loop(0, groups, per_head, (zeros, zeros))
    if halves > 1:  # the partner still reads every part of K and V until its last step
      plgpu.barrier_arrive(done.at[rw])
      plgpu.barrier_wait(done.at[rw])
    _at(k_own, (rw,), hf, halves)[...] = (dk * scale).astype(dtype)
    _at(v_own, (rw,), hf, halves)[...] = dv.astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(_at(k_own, (rw,), hf, halves), at(dk_ref))
    plgpu.copy_smem_to_gmem(_at(v_own, (rw,), hf, halves), at(dv_ref))
    plgpu.wait_smem_to_gmem(0)

  def memory_wg(kb, batch, kv_head, refs, scratch):
    q_ref, do_ref, lse_ref, delta_ref, idx_ref, ntotal_ref, seg_ref = refs
    (_, _, _, q_smem, do_smem, lse_smem, delta_smem, segq_smem, _, _, ready, free, _) = scratch
    plgpu.set_max_registers(MEMORY_REGISTERS, action='decrease')
    n_t = ntotal_ref[kb]

    def issue(t, slot):
      g = lax.div(t, lax.max(n_t, 1))
      head = kv_head * groups + g
      rows = pl.ds(idx_ref[kb, t - g * n_t] * bq, bq)
      _copy_parts(((q_ref, q_smem), (do_ref, do_smem)), (batch, rows, head), slot,
                  ready.at[slot], dh, halves)
      plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_smem.at[slot], ready.at[slot])
      plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows], delta_smem.at[slot],
                              ready.at[slot])
      if has_segments:
        plgpu.copy_gmem_to_smem(seg_ref.at[batch, rows], segq_smem.at[slot], ready.at[slot])

    _produce(groups * n_t, stages, ((free, issue),))

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, idx_ref, nfull_ref, ntotal_ref,
             *rest):
    seg_ref, dk_ref, dv_ref = rest if has_segments else (None, *rest)
    wg = lax.axis_index('wg')
    kv_head = lax.axis_index('heads')
    batch = lax.axis_index('batch')
    kb = lax.axis_index('k')

    def body(*scratch):
      @pl.when(wg < COMPUTE_WGS)
      def _():
        compute_wg(wg, kb, batch, kv_head, (k_ref, v_ref, idx_ref, nfull_ref, ntotal_ref,
                                            seg_ref, dk_ref, dv_ref), scratch)

      @pl.when(wg == COMPUTE_WGS)
      def _():
        memory_wg(kb, batch, kv_head,
                  (q_ref, do_ref, lse_ref, delta_ref, idx_ref, ntotal_ref, seg_ref), scratch)

    pl.run_scoped(
        body,
        _swizzled_smem(_parted((row_wgs,), halves, (WG_ROWS, dh)), dtype),
        _swizzled_smem(_parted((row_wgs,), halves, (WG_ROWS, dh)), dtype),
        plgpu.SMEM((row_wgs, WG_ROWS), jnp.int32) if has_segments else None,
        _swizzled_smem(_parted((stages,), halves, (bq, dh)), dtype),
        _swizzled_smem(_parted((stages,), halves, (bq, dh)), dtype),
        plgpu.SMEM((stages, bq), jnp.float32),
        plgpu.SMEM((stages, bq), jnp.float32),
        plgpu.SMEM((stages, bq), jnp.int32) if has_segments else None,
        _swizzled_smem((COMPUTE_WGS, WG_ROWS, bq), dtype) if interpret else None,
        plgpu.Barrier(num_arrivals=2 * halves + has_segments, num_barriers=row_wgs),
        plgpu.Barrier(num_arrivals=2 * halves + 2 + has_segments, num_barriers=stages),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=halves, num_barriers=row_wgs) if halves > 1 else None,
        collective_axes='wg',
    )

  inputs = [q, k, v, d_out, lse2, delta, jnp.asarray(idx), jnp.asarray(n_full),
            jnp.asarray(n_total), *segments]
  out_type = (jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype))
  return _launch(kernel, out_type, (hkv, s // cta_rows, b), ('heads', 'k', 'batch'),
                 interpret)(*inputs)


def _dq_call(q, k, v, d_out, lse2, delta, segments, blocks, *, causal, window, scale,
             has_segments, interpret, stages):
  """dQ: CTAs over (query heads, query blocks of WG_ROWS x row groups, batch)."""
  b, s, hq, d = q.shape
  hkv = k.shape[2]
  groups = hq // hkv
  dtype = q.dtype
  itemsize = jnp.dtype(dtype).itemsize
  bk = BWD_TILE
  halves = head_dim_parts(d)
  row_wgs = COMPUTE_WGS // halves
  cta_rows, dh = WG_ROWS * row_wgs, d // halves
  idx, n_full, n_total = tile_tables(blocks, s, cta_rows, bk, causal=causal, window=window,
                                     has_segments=has_segments)
  stages = bwd_stages(d, 2 * cta_rows * d * itemsize, 2 * bk * d * itemsize + bk * 4) \
      if stages is None else stages
  max_steps = int(n_total.max(initial=0))
  stages = max(1, min(stages, max_steps)) if max_steps else 1
  qk_scale = scale * _LOG2E
  lay = functools.partial(_layout, interpret=interpret)
  num_q_blocks = s // cta_rows
  shape = (WG_ROWS, bk)

  def compute_wg(wg, qb, batch, head, refs, scratch):
    q_ref, do_ref, lse_ref, delta_ref, idx_ref, nfull_ref, ntotal_ref, seg_ref, dq_ref = refs
    (q_own, do_own, lse_own, delta_own, segq_own, k_smem, v_smem, segk_smem, staging,
     own_ready, ready, free, done) = scratch
    plgpu.set_max_registers(COMPUTE_REGISTERS, action='increase')
    rw, hf = _wg_part(wg, halves)
    row0 = qb * cta_rows + rw * WG_ROWS
    rows = pl.ds(row0, WG_ROWS)
    at = lambda ref: ref.at[(batch, rows, head) + _head_cols(hf, dh, halves)]
    plgpu.copy_gmem_to_smem(at(q_ref), _at(q_own, (rw,), hf, halves), own_ready.at[rw])
    plgpu.copy_gmem_to_smem(at(do_ref), _at(do_own, (rw,), hf, halves), own_ready.at[rw])

    def rows_of_group():
      plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_own.at[rw], own_ready.at[rw])
      plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows], delta_own.at[rw],
                              own_ready.at[rw])
      if has_segments:
        plgpu.copy_gmem_to_smem(seg_ref.at[batch, rows], segq_own.at[rw], own_ready.at[rw])

    _first_part(hf, rows_of_group)
    plgpu.barrier_wait(own_ready.at[rw])
    rows_layout = plgpu.Layout.WGMMA.reduce(1)
    lse_rows = _load(lse_own.at[rw], rows_layout)
    delta_rows = _load(delta_own.at[rw], rows_layout)
    seg_q = _load(segq_own.at[rw], rows_layout) if has_segments else None
    n_f = nfull_ref[qb]
    n_t = ntotal_ref[qb]
    stage = None if staging is None else staging.at[wg]

    def step(t, dq, masked):
      slot = lax.rem(t, stages)
      plgpu.barrier_wait(ready.at[slot])

      def qk(acc_ref):  # contracts the whole head dim: every part of Q and K
        for h in range(halves):
          plgpu.wgmma(acc_ref, _at(q_own, (rw,), h, halves),
                      _transpose(_at(k_smem, (slot,), h, halves)))
        return acc_ref[...]

      def dov(acc_ref):
        for h in range(halves):
          plgpu.wgmma(acc_ref, _at(do_own, (rw,), h, halves),
                      _transpose(_at(v_smem, (slot,), h, halves)))
        return acc_ref[...]

      scores = pl.run_scoped(qk, plgpu.ACC(shape, jnp.float32)) * qk_scale
      if masked:
        seg_k = _load(segk_smem.at[slot], plgpu.Layout.WGMMA.reduce(0)) if has_segments \
            else None
        scores = _mask_tile(scores, row0, idx_ref[qb, t] * bk, seg_q, seg_k,
                            keys_on_rows=False, causal=causal, window=window, layout=lay)
      p = jnp.exp2(scores - lax.broadcast_in_dim(lse_rows, shape, [0]))
      dp = pl.run_scoped(dov, plgpu.ACC(shape, jnp.float32))
      ds = p * (dp - lax.broadcast_in_dim(delta_rows, shape, [0]))
      dq = _accumulate(dq, ds.astype(dtype), _at(k_smem, (slot,), hf, halves), stage)
      plgpu.barrier_arrive(free.at[slot])
      return dq

    dq = lay(jnp.zeros((WG_ROWS, dh), jnp.float32), plgpu.Layout.WGMMA)
    dq = lax.fori_loop(0, n_f, functools.partial(step, masked=False), dq)
    dq = lax.fori_loop(n_f, n_t, functools.partial(step, masked=True), dq)
    if halves > 1:  # the partner still reads every part of Q and dO until its last step
      plgpu.barrier_arrive(done.at[rw])
      plgpu.barrier_wait(done.at[rw])
    _at(q_own, (rw,), hf, halves)[...] = (dq * scale).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(_at(q_own, (rw,), hf, halves), at(dq_ref))
    plgpu.wait_smem_to_gmem(0)

  def memory_wg(qb, batch, head, refs, scratch):
    k_ref, v_ref, idx_ref, ntotal_ref, seg_ref = refs
    (*_, k_smem, v_smem, segk_smem, _, _, ready, free, _) = scratch
    plgpu.set_max_registers(MEMORY_REGISTERS, action='decrease')
    kv_head = lax.div(head, groups)

    def issue(t, slot):
      rows = pl.ds(idx_ref[qb, t] * bk, bk)
      _copy_parts(((k_ref, k_smem), (v_ref, v_smem)), (batch, rows, kv_head), slot,
                  ready.at[slot], dh, halves)
      if has_segments:
        plgpu.copy_gmem_to_smem(seg_ref.at[batch, rows], segk_smem.at[slot], ready.at[slot])

    _produce(ntotal_ref[qb], stages, ((free, issue),))

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, idx_ref, nfull_ref, ntotal_ref,
             *rest):
    seg_ref, dq_ref = rest if has_segments else (None, *rest)
    wg = lax.axis_index('wg')
    head = lax.axis_index('heads')
    batch = lax.axis_index('batch')
    qb = lax.axis_index('q')
    if causal:
      qb = num_q_blocks - 1 - qb  # longest rows first

    def body(*scratch):
      @pl.when(wg < COMPUTE_WGS)
      def _():
        compute_wg(wg, qb, batch, head, (q_ref, do_ref, lse_ref, delta_ref, idx_ref, nfull_ref,
                                         ntotal_ref, seg_ref, dq_ref), scratch)

      @pl.when(wg == COMPUTE_WGS)
      def _():
        memory_wg(qb, batch, head, (k_ref, v_ref, idx_ref, ntotal_ref, seg_ref), scratch)

    pl.run_scoped(
        body,
        _swizzled_smem(_parted((row_wgs,), halves, (WG_ROWS, dh)), dtype),
        _swizzled_smem(_parted((row_wgs,), halves, (WG_ROWS, dh)), dtype),
        plgpu.SMEM((row_wgs, WG_ROWS), jnp.float32),
        plgpu.SMEM((row_wgs, WG_ROWS), jnp.float32),
        plgpu.SMEM((row_wgs, WG_ROWS), jnp.int32) if has_segments else None,
        _swizzled_smem(_parted((stages,), halves, (bk, dh)), dtype),
        _swizzled_smem(_parted((stages,), halves, (bk, dh)), dtype),
        plgpu.SMEM((stages, bk), jnp.int32) if has_segments else None,
        _swizzled_smem((COMPUTE_WGS, WG_ROWS, bk), dtype) if interpret else None,
        plgpu.Barrier(num_arrivals=2 * halves + 2 + has_segments, num_barriers=row_wgs),
        plgpu.Barrier(num_arrivals=2 * halves + has_segments, num_barriers=stages),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=halves, num_barriers=row_wgs) if halves > 1 else None,
        collective_axes='wg',
    )

  inputs = [q, k, v, d_out, lse2, delta, jnp.asarray(idx), jnp.asarray(n_full),
            jnp.asarray(n_total), *segments]
  return _launch(kernel, jax.ShapeDtypeStruct(q.shape, dtype), (hq, num_q_blocks, b),
                 ('heads', 'q', 'batch'), interpret)(*inputs)
