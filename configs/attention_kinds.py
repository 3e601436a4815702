"""Three attention kinds in one stack: full causal flash, a sliding window and a BigBird layout.

The pattern 'flash:mlp, sliding_window:mlp, block_sparse:mlp' repeats twice over six layers
(a scan over two groups). Every mixer runs the same block-sparse flash op; only its mask differs:
the window layers see the 64 most recent tokens, the block-sparse layers blocks of 32 tokens (their
own and the previous one, the first block, one random earlier block). The end-of-training sample
decodes through the key/value cache (the window layers keep a ring buffer of 64 positions).
"""

from configs import base


def get_config():
  """A small mixed-attention model on the standard library; on CPU in a few minutes:

      python -m effjax.main --config=configs/attention_kinds.py --workdir=/tmp/effjax_kinds

  With backend 'auto' the op runs the plain-jnp reference on CPU, Triton on GPU and Mosaic on TPU
  (head_dim 64 suits the kernels).
  """
  config = base.get_config()
  m = config.model
  m.pattern = 'flash:mlp, sliding_window:mlp, block_sparse:mlp'
  m.num_layers = 6
  m.d_model = 256
  m.num_heads = 4  # head_dim 64
  m.num_kv_heads = 2
  m.attention_backend = 'auto'
  m.attention_window = 64
  m.block_sparse_block = 32
  m.block_sparse_local_blocks = 2
  m.block_sparse_global_blocks = 1
  m.block_sparse_random_blocks = 1
  config.data.seq_len = 256
  config.train.steps = 120
  config.train.eval_every = 60
  config.train.checkpoint_every = 60
  return config
