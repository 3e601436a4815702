"""A Jamba-like hybrid: three Mamba-2 blocks to one attention block with a mixture of experts.

    python -m effjax.main --config=configs/hybrid.py --workdir=/tmp/effjax_hybrid

The pattern 'mamba2:mlp, mamba2:mlp, mamba2:mlp, attention:moe' is one group of four blocks; two
groups make the 8 layers. Attention sees every earlier token (a key/value cache when decoding),
the Mamba-2 layers carry fixed-size states, and the MoE layers route each token to 2 of 8
experts of width 352: 10.7M parameters, 7.4M of them active per token. Any other mix is a
pattern away, e.g. 'gla:mlp, attention:mlp'.
"""

from configs import base


def get_config():
  config = base.get_config()
  m = config.model
  m.pattern = 'mamba2:mlp, mamba2:mlp, mamba2:mlp, attention:moe'
  m.num_layers = 8
  m.ssm_head_dim = 64
  m.ssm_state_dim = 64
  m.moe_num_experts = 8
  m.moe_top_k = 2
  m.moe_expert_mlp_dim = 352
  return config
