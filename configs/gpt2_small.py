"""GPT-2-small shape (124M with a 50304 vocabulary) for GPU throughput: bf16 compute, cuDNN attention.

    python -m effjax.main --config=configs/gpt2_small.py --workdir=/tmp/effjax_gpt2s

12 layers, width 768, 12 heads, sequence 1024, untied 50304-entry head as in GPT-2's padded
vocabulary. The byte tokenizer uses 259 of those entries: the shape (and so the speed) is GPT-2's,
the text is the embedded corpus. Parameters stay float32, matmuls run in bfloat16.
"""

from configs import base


def get_config():
  config = base.get_config()
  m = config.model
  m.vocab_size = 50304
  m.d_model = 768
  m.num_layers = 12
  m.num_heads = 12
  m.num_kv_heads = 12
  m.mlp_dim = 2048  # SwiGLU with 8/3 * 768: the same FLOPs as GPT-2's 4x GELU MLP
  m.tie_embeddings = False
  m.compute_dtype = 'bfloat16'
  # bf16 logits out of the head matmul (accumulated in fp32, loss computed in fp32), as
  # bf16-autocast PyTorch does: 44.5% vs 42.8% MFU with float32 logits on an H200.
  m.output_dtype = 'bfloat16'
  m.remat_policy = 'none'
  m.scan_layers = False  # unrolled: 77 ms vs 93 ms a step on an H200 (experiments/throughput)
  config.data.seq_len = 1024
  # 128 x 1024 tokens a step, loss in chunks of 256 positions: the fastest setting measured on an
  # H200 (45.4% MFU; 64 rows: 44.7%; experiments/throughput/README.md).
  config.train.batch_size = 128
  config.train.loss_chunk_size = 256
  config.train.steps = 2000
  config.train.eval_every = 500
  config.train.checkpoint_every = 500
  config.optim.learning_rate = 6e-4
  config.optim.warmup_steps = 100
  return config
