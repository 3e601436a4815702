"""Gated linear attention in place of softmax attention: the default model with 'gla:mlp' blocks.

    python -m effjax.main --config=configs/gla.py --workdir=/tmp/effjax_gla

Every layer's mixer is GLA (effjax/models/linear_attention.py): a data-dependent decay per head,
the chunked form for training (effjax/kernels/chunked_scan: Pallas on GPU and TPU, the chunked
steps in plain JAX on CPU) and a fixed-size [heads, 64, 64] state for decoding. The same file
runs retention or kernelised linear attention with `--config.model.pattern=retnet:mlp` or
`linear_attention:mlp`. On two CPU cores: about the default's 4-5 minutes.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.pattern = 'gla:mlp'
  config.model.num_kv_heads = config.model.num_heads  # linear attention has no grouped heads
  return config
