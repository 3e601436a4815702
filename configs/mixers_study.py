"""The sequence-mixer study (experiments/mixers): a 26M-parameter model on the embedded corpus.

    python -m effjax.main --config=configs/mixers_study.py --workdir=/tmp/mixer_runs/attention

Width 512, 8 heads of 64, SwiGLU 1408, byte-level, sequence 256, 8 rows a step, 400 steps
(0.82M tokens), peak learning rate 1.5e-3 with 40 warmup steps and cosine decay, held-out loss
every 50 steps on 64K tokens. This file is the softmax-attention baseline ('attention:mlp' x 8,
25.7M parameters); experiments/mixers/run_cpu.sh trains GLA, Mamba-2 and a hybrid of the same
size on the same tokens by overriding the pattern (and the depth, for the MLP-free Mamba stack).
"""

from configs import base


def get_config():
  config = base.get_config()
  m = config.model
  m.d_model = 512
  m.num_layers = 8
  m.num_heads = 8
  m.num_kv_heads = 8
  m.mlp_dim = 1408
  m.pattern = 'attention:mlp'
  m.ssm_head_dim = 64
  m.ssm_state_dim = 64
  t = config.train
  t.steps = 400
  t.eval_every = 50
  t.eval_batches = 32
  t.checkpoint_every = 100
  o = config.optim
  o.learning_rate = 1.5e-3
  o.warmup_steps = 40
  config.generate.max_new_tokens = 64
  return config
