"""A pure Mamba-2 stack: the default width with 8 'mamba2:none' blocks (no MLPs), ~3.5M parameters.

    python -m effjax.main --config=configs/mamba.py --workdir=/tmp/effjax_mamba

Each block is one Mamba-2 mixer (effjax/models/ssm.py: inner width 512 in 8 heads of 64, state
64, a 4-tap causal convolution) and no feed-forward, as in the Mamba papers, so twice the
default's depth holds about its parameters. Training runs SSD through the chunked-scan op;
decoding carries a [8, 64, 64] state and the convolution's last 3 inputs per layer, whatever the
context length. Mamba-1 (selective scan, state 16 per channel):
`--config.model.pattern=mamba1:none --config.model.ssm_state_dim=16`.
"""

from configs import base


def get_config():
  config = base.get_config()
  m = config.model
  m.pattern = 'mamba2:none'
  m.num_layers = 8
  m.ssm_expand = 2
  m.ssm_head_dim = 64
  m.ssm_state_dim = 64
  return config
