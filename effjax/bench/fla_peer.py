"""flash-linear-attention's chunk kernel for scalar-gated linear attention, timed as a peer.

    python3 -m effjax.bench.fla_peer [--seq_lens=1024,4096,16384] [--out=FILE.json]

The same computation as effjax's chunked scan with a per-head decay (GLA with a scalar gate,
RetNet, SSD): fla.ops.simple_gla.chunk_simple_gla, forward only (its backward does not run on
every Triton build), bf16, at the scan benchmark's 'gla' shapes (B*S = 16k tokens, H=16, K=V=128)
and with the same kind of log-decays, so its tokens/s can be set beside the kernel benchmark's
rows of the same run. Needs PyTorch with CUDA and the flash-linear-attention package (imported as
`fla`); neither is a dependency of effjax. Timing: CUDA events around each call, a warm-up call
per input set (Triton autotunes on the first), the median of `repeats` calls rotating over three
input sets.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seq_lens', default='1024,2048,4096,8192,16384,32768')
  parser.add_argument('--tokens', type=int, default=16384)
  parser.add_argument('--heads', type=int, default=16)
  parser.add_argument('--head_dim', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--out', default='')
  args = parser.parse_args()

  import torch
  from fla.ops.simple_gla import chunk_simple_gla

  kwargs = {'head_first': False} if 'head_first' in inspect.signature(
      chunk_simple_gla).parameters else {}
  rows = []
  for seq_len in (int(s) for s in args.seq_lens.split(',')):
    b, h, d = max(1, args.tokens // seq_len), args.heads, args.head_dim
    sets = []
    for _ in range(3):
      q = torch.randn(b, seq_len, h, d, device='cuda', dtype=torch.bfloat16)
      k = (torch.randn(b, seq_len, h, d, device='cuda') * d ** -0.5).to(torch.bfloat16)
      v = torch.randn(b, seq_len, h, d, device='cuda', dtype=torch.bfloat16)
      g = torch.nn.functional.logsigmoid(torch.randn(b, seq_len, h, device='cuda') + 3.0) / 16
      sets.append((q, k, v, g))
    call = lambda q, k, v, g: chunk_simple_gla(q=q, k=k, v=v, g=g, scale=d ** -0.5, **kwargs)
    for s in sets:
      call(*s)
    torch.cuda.synchronize()
    times = []
    for i in range(args.repeats):
      start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      start.record()
      call(*sets[i % 3])
      end.record()
      torch.cuda.synchronize()
      times.append(start.elapsed_time(end))
    ms = statistics.median(times)
    row = {'impl': 'fla chunk_simple_gla', 'mode': 'fwd', 'batch': b, 'seq_len': seq_len,
           'num_heads': h, 'head_dim': d, 'ms': ms, 'mtokens_per_s': b * seq_len / ms / 1e3,
           'ms_calls': times}
    rows.append(row)
    print(f"fla S={seq_len} B={b}: {ms:.3f} ms, {row['mtokens_per_s']:.1f} M tokens/s")
  record = {'device': torch.cuda.get_device_name(), 'torch': torch.__version__,
            'fla': getattr(__import__('fla'), '__version__', '?'), 'rows': rows}
  if args.out:
    with open(args.out, 'w', encoding='utf-8') as f:
      json.dump(record, f, indent=1)


if __name__ == '__main__':
  main()
