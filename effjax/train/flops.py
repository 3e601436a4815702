"""FLOPs per token and model FLOPs utilisation (MFU).

Formula (one multiply-add = 2 FLOPs; training = forward + backward = 3x forward):

    train_flops_per_token = 3 * ( sum over blocks of [mixer.flops_per_token + ff.flops_per_token]
                                  + 2 * d_model * vocab_size )            # output head

For softmax attention, mixer.flops_per_token = 2 * d_model * head_dim * (2*heads + 2*kv_heads)
(the q, k, v, o projections) + 4 * seq_len * heads * head_dim * 0.5: the score and value matmuls,
counted at half because causal attention computes only the lower triangle. The embedding lookup is
a gather and counts nothing. With every block dense this is the familiar 6*N + 6*L*T*d_attn form
(N = non-embedding matmul parameters plus the head), but attention at half.

The flash-op mixers ('flash', 'sliding_window', 'block_sparse') count instead the score and value
matmuls of the tiles their kernel computes at its default block sizes (the kernel package's
`attention_flops`, which walks `computed_blocks`), divided by the sequence length: a window of w
costs O(w) per token whatever the length, a sparse layout only its visited blocks, and the partly
masked tiles on the diagonal count in full, since the kernel spends that work. Training still
counts 3x forward: the flash backward's recomputation of the probabilities is remat, not model
work (`attention_flops(..., backward=True)` gives the backward's actual cost).

A mixture-of-experts feed-forward ('moe') counts its active parameters only: the router, the
top_k routed experts a token runs through and the shared experts (not every expert it holds).

    MFU = tokens_per_second * train_flops_per_token / (num_devices * peak_flops_per_device)

Rematerialisation's recomputation is *not* counted (that would be hardware FLOPs utilisation);
MFU measures useful work only.
"""

from __future__ import annotations

import jax

from effjax.models.lm import block_kinds
from effjax.models.registry import FEED_FORWARDS, MIXERS

# Dense bf16 peak per device, FLOP/s, from the vendors' data sheets (no sparsity).
PEAK_BF16_FLOPS = {
    'H100': 989e12,
    'H200': 989e12,
    'GH200': 989e12,
    'B200': 2250e12,
    'A100': 312e12,
    'L4': 121e12,
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v5': 459e12,
    'TPU v6 lite': 918e12,
    'TPU v6e': 918e12,
}


def forward_flops_per_token(model_cfg, seq_len: int) -> float:
  """Forward FLOPs per token of the whole model at a sequence length (see the module docstring)."""
  total = 0.0
  for mixer, ff in block_kinds(model_cfg):
    total += MIXERS.get(mixer).flops_per_token(model_cfg, seq_len)
    total += FEED_FORWARDS.get(ff).flops_per_token(model_cfg, seq_len)
  total += 2 * model_cfg.d_model * model_cfg.vocab_size  # output head
  return total


def train_flops_per_token(model_cfg, seq_len: int) -> float:
  return 3 * forward_flops_per_token(model_cfg, seq_len)


def peak_flops_per_device(device: jax.Device | None = None, override_tflops: float = 0.0) -> float | None:
  """Peak dense bf16 FLOP/s of a device; None when unknown (CPU), so no MFU is claimed."""
  if override_tflops:
    return override_tflops * 1e12
  device = device or jax.devices()[0]
  kind = getattr(device, 'device_kind', '')
  for name in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # longest match first
    if name.lower() in kind.lower():
      return PEAK_BF16_FLOPS[name]
  return None


def mfu(tokens_per_second: float, flops_per_token: float, num_devices: int,
        peak_per_device: float | None) -> float | None:
  if not peak_per_device:
    return None
  return tokens_per_second * flops_per_token / (num_devices * peak_per_device)
