"""The PyTorch peer for the training benchmark: the same decoder, timed the same way.

    python3 -m effjax.bench.torch_peer --layers=12 --width=768 --heads=12 --mlp=2048 \
        --vocab=50304 --seq=1024 --batch=32 [--no-compile] [--out=row.json]

Same architecture and FLOPs as effjax's 'attention:mlp' model (pre-norm RMSNorm, rotary
attention through scaled_dot_product_attention (flash/cuDNN backends), SwiGLU, untied head),
trained the way a tuned PyTorch run is: fp32 master weights, bf16 autocast, torch.compile,
fused AdamW, one causal sequence per row. Timing as effjax.bench.train: warm-up steps, then
windows of back-to-back steps with the device synchronised at window ends; median window.
Needs torch (not an effjax dependency); used only to put a peer's number in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time


def main() -> None:
  import torch
  import torch.nn.functional as F
  from torch import nn

  p = argparse.ArgumentParser()
  for name, default in (('layers', 12), ('width', 768), ('heads', 12), ('mlp', 2048),
                        ('vocab', 50304), ('seq', 1024), ('batch', 32), ('warmup', 5),
                        ('steps', 10), ('repeats', 3)):
    p.add_argument(f'--{name}', type=int, default=default)
  p.add_argument('--no-compile', action='store_true')
  p.add_argument('--out', default='')
  args = p.parse_args()
  torch.manual_seed(0)
  torch.backends.cuda.matmul.allow_tf32 = True
  dev = 'cuda'
  head_dim = args.width // args.heads

  class Block(nn.Module):

    def __init__(self):
      super().__init__()
      d = args.width
      self.n1, self.n2 = nn.RMSNorm(d), nn.RMSNorm(d)
      self.qkv = nn.Linear(d, 3 * d, bias=False)
      self.o = nn.Linear(d, d, bias=False)
      self.gate_up = nn.Linear(d, 2 * args.mlp, bias=False)
      self.down = nn.Linear(args.mlp, d, bias=False)

    def forward(self, x, cos, sin):
      b, t, d = x.shape
      q, k, v = self.qkv(self.n1(x)).view(b, t, 3, args.heads, head_dim).unbind(2)

      def rope(z):
        z1, z2 = z[..., :head_dim // 2], z[..., head_dim // 2:]
        return torch.cat([z1 * cos - z2 * sin, z2 * cos + z1 * sin], -1)

      q, k, v = rope(q).transpose(1, 2), rope(k).transpose(1, 2), v.transpose(1, 2)
      a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
      g, u = self.gate_up(self.n2(x)).chunk(2, -1)
      return x + self.down(F.silu(g) * u)

  class Model(nn.Module):

    def __init__(self):
      super().__init__()
      self.emb = nn.Embedding(args.vocab, args.width)
      self.blocks = nn.ModuleList([Block() for _ in range(args.layers)])
      self.norm = nn.RMSNorm(args.width)
      self.head = nn.Linear(args.width, args.vocab, bias=False)
      inv = 1.0 / (10000 ** (torch.arange(0, head_dim // 2).float() / (head_dim // 2)))
      ang = torch.arange(args.seq).float()[:, None] * inv[None]
      self.register_buffer('cos', ang.cos()[None, :, None, :], persistent=False)
      self.register_buffer('sin', ang.sin()[None, :, None, :], persistent=False)

    def forward(self, idx, targets):
      x = self.emb(idx)
      for blk in self.blocks:
        x = blk(x, self.cos, self.sin)
      logits = self.head(self.norm(x))
      return F.cross_entropy(logits.float().reshape(-1, args.vocab), targets.reshape(-1))

  model = Model().to(dev)
  n_params = sum(p.numel() for p in model.parameters())
  opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                          fused=True)
  fwd = model if args.no_compile else torch.compile(model)

  def step(idx, tgt):
    with torch.autocast('cuda', dtype=torch.bfloat16):
      loss = fwd(idx, tgt)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  batches = [torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=dev) for _ in range(2)]
  t0 = time.perf_counter()
  for i in range(args.warmup):
    b = batches[i % 2]
    loss = step(b[:, :-1], b[:, 1:])
  torch.cuda.synchronize()
  warm_s = time.perf_counter() - t0
  windows = []
  for _ in range(args.repeats):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(args.steps):
      b = batches[i % 2]
      loss = step(b[:, :-1], b[:, 1:])
    torch.cuda.synchronize()
    windows.append((time.perf_counter() - t0) / args.steps)
  step_time = statistics.median(windows)
  tokens = args.batch * args.seq
  d, f, v, t = args.width, args.mlp, args.vocab, args.seq
  # The same formula as effjax.train.flops: 3 x forward, attention scores at half (causal).
  forward = args.layers * (2 * 4 * d * d + 0.5 * 4 * t * d + 2 * 3 * d * f) + 2 * d * v
  flops_per_token = 3 * forward
  row = {'name': 'PyTorch peer' + (' (eager)' if args.no_compile else ' (torch.compile)'),
         'framework': f'torch {torch.__version__}', 'params_m': n_params / 1e6,
         'tokens_per_step': tokens, 'step_time_ms': 1e3 * step_time,
         'step_time_windows_ms': [1e3 * w for w in windows],
         'step_time_spread_pct': 100 * (max(windows) - min(windows)) / step_time,
         'tokens_per_second': tokens / step_time, 'flops_per_token': flops_per_token,
         'mfu_percent': 100 * tokens / step_time * flops_per_token / 989e12,
         'peak_memory_gb': torch.cuda.max_memory_allocated() / 1e9,
         'compile_s': warm_s, 'loss_last': loss.item(), 'args': vars(args)}
  print(json.dumps(row))
  if args.out:
    with open(args.out, 'w', encoding='utf-8') as fh:
      json.dump(row, fh, indent=2)
  assert math.isfinite(row['loss_last'])


if __name__ == '__main__':
  main()
