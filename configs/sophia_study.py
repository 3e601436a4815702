"""The Sophia vs AdamW study's model: a ~120M GPT-style byte-level LM on the embedded corpus.

    python -m effjax.main --config=configs/sophia_study.py --workdir=DIR \
        --config.optim.name=sophia_g --config.optim.learning_rate=... --config.optim.rho=...

Width 896, 12 layers, 14 heads of 64, SwiGLU 2432: 117M parameters in the blocks (0.7M in the
byte embedding and head). Sequence 1024, 32 rows a step, 1000 steps (33M tokens), learning rate
decayed fully to zero by the last step, as a fair AdamW baseline needs. Every run of the study
(experiments/sophia_vs_adamw/run_gpu.sh) is this file plus optimizer overrides.
"""

from configs import base


def get_config():
  config = base.get_config()
  m = config.model
  m.d_model = 896
  m.num_layers = 12
  m.num_heads = 14
  m.num_kv_heads = 14
  m.mlp_dim = 2432
  m.tie_embeddings = False
  m.compute_dtype = 'bfloat16'
  m.scan_layers = False
  config.data.seq_len = 1024
  config.train.batch_size = 32
  config.train.steps = 1000
  config.train.log_every = 10
  config.train.eval_every = 50
  config.train.eval_batches = 16
  config.train.checkpoint_every = 1000
  config.generate.at_end = False
  o = config.optim
  o.name = 'adamw'
  o.learning_rate = 1e-3
  o.warmup_steps = 50
  o.schedule = 'cosine'
  o.min_lr_ratio = 0.0
  o.weight_decay = 0.1
  o.clip_norm = 1.0
  return config
