"""An 8-expert top-2 MoE and its dense twin of equal active parameters, for GPU step benchmarks.

    python -m effjax.bench train --config=configs/moe_gpu.py \\
        --sweep=model.pattern=attention:mlp,attention:moe

12 layers, width 1024, 16 heads, sequence 2048, untied 50304-entry head, bf16 compute. With
pattern 'attention:moe' each feed-forward is 8 SwiGLU experts of width 2048, top-2, dropless
(grouped matmuls, effjax/kernels/grouped_matmul): a token runs through 2 x 2048 hidden units.
With 'attention:mlp' the feed-forward is one SwiGLU of width 4096: the same active parameters
and FLOPs per token (the MoE adds a 1024 x 8 router), a quarter of the MoE's expert weights.
experiments/moe/run_gpu.sh runs the comparison and the grouped-matmul kernel grid.
"""

from configs import base


def get_config():
  config = base.get_config()
  m = config.model
  m.vocab_size = 50304
  m.d_model = 1024
  m.num_layers = 12
  m.num_heads = 16
  m.num_kv_heads = 16
  m.mlp_dim = 4096  # the dense twin's width (pattern 'attention:mlp')
  m.pattern = 'attention:moe'
  m.moe_num_experts = 8
  m.moe_top_k = 2
  m.moe_expert_mlp_dim = 2048  # top_k x 2048 = the dense width
  m.moe_capacity_factor = 0.0
  m.tie_embeddings = False
  m.compute_dtype = 'bfloat16'
  m.output_dtype = 'bfloat16'
  m.remat_policy = 'none'
  m.scan_layers = False
  config.data.seq_len = 2048
  config.train.batch_size = 16
  config.train.loss_chunk_size = 512
  config.train.steps = 2000
  config.train.eval_every = 500
  config.train.checkpoint_every = 500
  config.optim.learning_rate = 6e-4
  config.optim.warmup_steps = 100
  return config
