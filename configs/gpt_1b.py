"""A ~1B-parameter decoder at sequence 2048 for single- and multi-GPU throughput.

    python -m effjax.main --config=configs/gpt_1b.py --workdir=/tmp/effjax_1b
    python -m effjax.bench train --config=configs/gpt_1b.py

Width 2048, 16 layers, 16 heads of 128, SwiGLU 5632, untied 50304-entry head: 0.82B parameters
in the blocks plus 0.21B in embedding and head (1.03B in all). bf16 compute, float32 parameters
and Adam moments. Layers unrolled (faster on GPU than a scan; set model.scan_layers=True for
compile time independent of depth). The batch and remat policy that maximised MFU on one H200
are recorded in experiments/throughput/README.md.
"""

from configs import base


def get_config():
  config = base.get_config()
  m = config.model
  m.vocab_size = 50304
  m.d_model = 2048
  m.num_layers = 16
  m.num_heads = 16
  m.num_kv_heads = 16
  m.mlp_dim = 5632
  m.tie_embeddings = False
  m.compute_dtype = 'bfloat16'
  m.scan_layers = False
  m.remat_policy = 'none'
  config.data.seq_len = 2048
  config.train.batch_size = 16
  config.train.loss_chunk_size = 512
  config.train.steps = 2000
  config.train.eval_every = 500
  config.train.checkpoint_every = 500
  config.optim.learning_rate = 3e-4
  config.optim.warmup_steps = 100
  return config
