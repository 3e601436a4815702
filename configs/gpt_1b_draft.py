"""A 4-layer, width-1024 draft for configs/gpt_1b.py: the same 50304-entry vocabulary and tokenizer.

    python -m effjax.main --config=configs/gpt_1b_draft.py --workdir=/tmp/effjax_1b_draft
    python -m effjax.bench decode --config=configs/gpt_1b.py --methods=plain,speculative \
        --draft_config=configs/gpt_1b_draft.py --contexts=1024,8192

4 x 1024, 8 heads of 128, SwiGLU 2816, untied head: 51M parameters in the blocks plus 103M in
embedding and head (about 0.15B, ~15% of the target's bytes read per step; the head dominates,
as it does for any small draft of a 50k vocabulary). bf16 compute, layers unrolled.
"""

from configs import gpt_1b


def get_config():
  config = gpt_1b.get_config()
  m = config.model
  m.d_model = 1024
  m.num_layers = 4
  m.num_heads = 8
  m.num_kv_heads = 8
  m.mlp_dim = 2816
  return config
