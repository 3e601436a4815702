"""effjax data: documents -> tokens -> packed, per-host batches, with checkpointable order.

The trainer calls exactly these four functions; `config` is the whole ConfigDict of
configs/base.py and only its `data`, `train.batch_size` and `seed` fields are read.

  make_tokenizer(config)                   the configured tokenizer ('byte' or 'sentencepiece')
  make_train_iterator(config, *, process_index=0, process_count=1)
                                           endless grain DatasetIterator of training batches
  make_eval_batches(config, num_batches, *, process_index=0, process_count=1)
                                           a fixed, cached list of validation batches
  data_dir(config)                         where datasets and tokenizer models live

See pipeline.py for the stages and the batch format, sources.py for where documents come from.
"""

from effjax.data.pipeline import make_eval_batches
from effjax.data.pipeline import make_train_iterator
from effjax.data.sources import data_dir
from effjax.data.tokenizers import ByteTokenizer
from effjax.data.tokenizers import make_tokenizer
from effjax.data.tokenizers import SentencePieceTokenizer
from effjax.data.tokenizers import Tokenizer

__all__ = [
    'ByteTokenizer',
    'SentencePieceTokenizer',
    'Tokenizer',
    'data_dir',
    'make_eval_batches',
    'make_tokenizer',
    'make_train_iterator',
]
