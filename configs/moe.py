"""A small mixture-of-experts model: every feed-forward routes to 2 of 8 fine-grained experts.

The pattern 'attention:moe' repeats over four layers; each MoE layer has 8 SwiGLU experts of
width 256 (about a third of the dense mlp width, so a token's two experts cost less than the dense
layer they replace), a float32 router with the load-balancing and z losses, and dropless token
choice. Train metrics add moe_aux_loss, moe_z_loss, moe_router_entropy, moe_dropped_fraction and
the largest/smallest expert load.
"""

from configs import base


def get_config():
  """On CPU (about 3 s a step on two cores, ~7 minutes in all):

      python -m effjax.main --config=configs/moe.py --workdir=/tmp/effjax_moe

  Expert parallelism over 8 simulated CPU devices (experts split 4 ways, the batch 8 ways):

      XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m effjax.main \\
        --config=configs/moe.py --workdir=/tmp/effjax_moe_ep --config.mesh.data=2 \\
        --config.mesh.expert=4
  """
  config = base.get_config()
  m = config.model
  m.pattern = 'attention:moe'
  m.num_layers = 4
  m.moe_num_experts = 8
  m.moe_top_k = 2
  m.moe_expert_mlp_dim = 256
  m.moe_routing = 'token_choice'
  m.moe_capacity_factor = 0.0  # dropless
  m.moe_aux_loss_weight = 0.01
  m.moe_z_loss_weight = 1e-3
  config.train.steps = 120
  config.train.eval_every = 60
  config.train.checkpoint_every = 60
  return config
