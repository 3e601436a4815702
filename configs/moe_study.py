"""MoE vs dense at equal active FLOPs on the embedded corpus (experiments/moe), on CPU.

The default 3M-parameter model's shape (4 x 256, SwiGLU 704) with every feed-forward replaced by
8 experts of width 352, each token routed to 2 of them (dropless token choice): a token runs
through 2 x 352 = 704 hidden units, as in the dense model, so the two cost the same FLOPs per
token (plus a 256 x 8 router) while the MoE holds four times the feed-forward parameters. 1000
steps of 2,048 tokens (2M tokens), held-out loss every 100 steps on 64K tokens.

    python -m effjax.main --config=configs/moe_study.py --workdir=/tmp/moe_runs/moe_8x2

The dense baseline is the same file with `--config.model.pattern=attention:mlp`; the study's
other variants and its analysis: experiments/moe/run_cpu.sh. On two CPU cores a MoE run takes
about 16 minutes, the dense one about 5.
"""

from configs import base


def get_config():
  config = base.get_config()
  m = config.model
  m.pattern = 'attention:moe'
  m.moe_num_experts = 8
  m.moe_top_k = 2
  m.moe_expert_mlp_dim = 352  # top_k x 352 = the dense mlp_dim (704 at d_model 256)
  m.moe_routing = 'token_choice'
  m.moe_capacity_factor = 0.0
  m.moe_aux_loss_weight = 0.01
  m.moe_z_loss_weight = 1e-3
  t = config.train
  t.steps = 1000
  t.eval_every = 100
  t.eval_batches = 32
  t.checkpoint_every = 250
  config.generate.max_new_tokens = 64
  return config
