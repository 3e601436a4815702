"""Tokenizers: UTF-8 bytes by default, or a SentencePiece model trained locally on the train split.

Both share the ids the model and the pipeline rely on: pad 0 (also the 'no target' id of packed
rows), bos 1, eos 2. `decode` never raises: generated ids can be anything, including ids past the
vocabulary (the model's vocab is padded up to a multiple of 128) and byte sequences that are not
UTF-8, and a sample printed during training must not crash the run.
"""

import io
import os
from typing import Iterator, Protocol, Sequence

import numpy as np
import sentencepiece

from effjax.data import sources

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int

  def encode(self, text: str) -> list[int]:
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...


class ByteTokenizer:
  """UTF-8 bytes shifted past the special ids: byte b is id b + 3; 259 ids in all."""

  pad_id = PAD_ID
  bos_id = BOS_ID
  eos_id = EOS_ID
  byte_offset = 3
  vocab_size = 256 + byte_offset

  def encode(self, text: str) -> list[int]:
    return self.encode_array(text).tolist()

  def encode_array(self, text: str) -> np.ndarray:
    """int32 ids without a Python loop: the pipeline encodes whole source files."""
    raw = np.frombuffer(text.encode('utf-8'), dtype=np.uint8)
    return raw.astype(np.int32) + self.byte_offset

  def decode(self, ids: Sequence[int]) -> str:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    is_byte = (ids >= self.byte_offset) & (ids < self.vocab_size)
    raw = (ids[is_byte] - self.byte_offset).astype(np.uint8).tobytes()
    return raw.decode('utf-8', errors='replace')

  def __repr__(self) -> str:
    return 'ByteTokenizer(vocab_size=259)'


class SentencePieceTokenizer:
  """A trained SentencePiece model with byte fallback (so any text encodes, nothing is <unk>).

  Pickles as the serialized model, so grain worker processes can receive it.
  """

  def __init__(self, model_proto: bytes, name: str = ''):
    self._model_proto = model_proto
    self._name = name
    self._processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._processor.get_piece_size()
    self.pad_id = self._processor.pad_id()
    self.bos_id = self._processor.bos_id()
    self.eos_id = self._processor.eos_id()
    if (self.pad_id, self.bos_id, self.eos_id) != (PAD_ID, BOS_ID, EOS_ID):
      raise ValueError(f'SentencePiece model {name!r} has pad/bos/eos ids '
                       f'{(self.pad_id, self.bos_id, self.eos_id)}, effjax needs (0, 1, 2)')

  @classmethod
  def load(cls, model_path: str) -> 'SentencePieceTokenizer':
    with open(model_path, 'rb') as f:
      return cls(f.read(), name=model_path)

  def encode(self, text: str) -> list[int]:
    return self._processor.encode(text)

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self._processor.encode(text), dtype=np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    specials = (self.pad_id, self.bos_id, self.eos_id)
    kept = [int(i) for i in np.asarray(ids).reshape(-1)
            if 0 <= i < self.vocab_size and i not in specials]
    return self._processor.decode(kept)

  def __getstate__(self):
    return {'model_proto': self._model_proto, 'name': self._name}

  def __setstate__(self, state):
    self.__init__(state['model_proto'], name=state['name'])

  def __repr__(self) -> str:
    return f'SentencePieceTokenizer(vocab_size={self.vocab_size}, model={self._name!r})'


# -------------------------------------------------------------------------------- training

# The training text is capped: 4M characters train a 4096-piece BPE model in about 1.5 s on a CPU
# core, and more text barely changes the pieces (measured: 3.75 -> 3.88 chars per token at 10M).
MAX_TRAINING_CHARS = 4_000_000
# Documents are cut into pieces of this many characters, because SentencePiece treats its input as
# sentences and caps their length; multi-line pieces let it learn newline + indentation tokens.
TRAINING_SENTENCE_CHARS = 2_000


def training_sentences(documents, max_chars: int = MAX_TRAINING_CHARS) -> Iterator[str]:
  """Cuts documents (a sequence of {'text'}) into sentence-sized pieces, max_chars in all."""
  total = 0
  for index in range(len(documents)):
    text = documents[index]['text']
    for start in range(0, len(text), TRAINING_SENTENCE_CHARS):
      piece = text[start:start + TRAINING_SENTENCE_CHARS]
      yield piece
      total += len(piece)
      if total >= max_chars:
        return


def train_sentencepiece(sentences: Iterator[str], vocab_size: int) -> bytes:
  """Trains a BPE SentencePiece model that keeps text byte-exact; returns the serialized model.

  Identity normalization and no whitespace folding, so that code (indentation, tabs, blank lines)
  decodes to exactly what was encoded. Single-threaded, so that every host of a multi-host run
  that trains its own copy gets the same model.
  """
  model = io.BytesIO()
  try:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=sentences,
        model_writer=model,
        vocab_size=vocab_size,
        model_type='bpe',
        byte_fallback=True,
        character_coverage=0.9995,
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=3,
        normalization_rule_name='identity',
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=4 * TRAINING_SENTENCE_CHARS,  # bytes; UTF-8 takes up to 4 per char
        num_threads=1,
        minloglevel=2,
    )
  except RuntimeError as e:
    if 'Vocabulary size' in str(e):
      raise ValueError(
          f'data.sentencepiece_vocab_size={vocab_size} is too small or too large for the training '
          f'text (byte fallback alone takes 260 ids, plus one per frequent character): {e}') from e
    raise
  return model.getvalue()


def sentencepiece_model_path(config) -> str:
  """Where the model of this source and vocab size lives, so later runs reuse it."""
  name = f'sentencepiece-{sources.source_key(config)}-vocab{config.data.sentencepiece_vocab_size}'
  return os.path.join(sources.data_dir(config), 'tokenizers', name + '.model')


def trained_sentencepiece(config) -> SentencePieceTokenizer:
  """Loads the model for this config, training it on the train split first if it is not there."""
  model_path = sentencepiece_model_path(config)
  if not os.path.exists(model_path):
    with sources.file_lock(model_path + '.lock'):
      if not os.path.exists(model_path):
        # Sample the training text from a fixed shuffle, not file order: text files sorted by path
        # would otherwise train on one directory only.
        documents = sources.load_documents(config, 'train')
        if len(documents) == 0:
          raise ValueError(f'no training documents to train a tokenizer on ({config.data.source})')
        documents = documents.shuffle(seed=0)
        model_proto = train_sentencepiece(
            training_sentences(documents), config.data.sentencepiece_vocab_size)
        partial_path = f'{model_path}.partial.{os.getpid()}'
        with open(partial_path, 'wb') as f:
          f.write(model_proto)
        os.replace(partial_path, model_path)  # atomic: readers see no model or a whole one
  return SentencePieceTokenizer.load(model_path)


def make_tokenizer(config) -> Tokenizer:
  """The tokenizer `data.tokenizer` names: 'byte' or 'sentencepiece'."""
  kind = config.data.tokenizer
  if kind == 'byte':
    return ByteTokenizer()
  if kind == 'sentencepiece':
    return trained_sentencepiece(config)
  raise ValueError(f"data.tokenizer={kind!r} is not one of 'byte', 'sentencepiece'")
