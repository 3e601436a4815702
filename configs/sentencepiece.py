"""The default model with a 4096-piece SentencePiece vocabulary trained locally on the corpus.

    python -m effjax.main --config=configs/sentencepiece.py --workdir=/tmp/effjax_sp

The tokenizer is trained once on the training split (a few seconds) and cached in the data dir.
A token covers ~3 bytes of Python source, so the same steps see ~3x more text than the byte model;
losses are per token, not per byte, and are not comparable to configs/default.py directly.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.data.tokenizer = 'sentencepiece'
  config.data.sentencepiece_vocab_size = 4096
  config.model.vocab_size = 4096
  return config
