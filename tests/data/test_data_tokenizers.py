"""Tokenizers: exact round trips, decoding that never raises, a SentencePiece model trained here."""

import os
import pickle

import numpy as np
import pytest

from effjax.data import sources
from effjax.data import tokenizers


def random_unicode(rng: np.random.Generator, length: int) -> str:
  """Code points from every plane (ASCII, accents, CJK, emoji), no surrogates (not encodable)."""
  ranges = [(0x0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
  picks = rng.integers(0, len(ranges), size=length)
  return ''.join(chr(int(rng.integers(lo, hi + 1))) for lo, hi in (ranges[p] for p in picks))


def test_byte_tokenizer_ids_and_round_trip(fresh_seed):
  rng = np.random.default_rng(fresh_seed)
  tok = tokenizers.ByteTokenizer()
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 0, 1, 2)
  assert tok.encode('\x00A\xff') == [3, 3 + 65, 3 + 0xC3, 3 + 0xBF]
  for _ in range(20):
    text = random_unicode(rng, int(rng.integers(0, 200)))
    ids = tok.encode(text)
    assert all(3 <= i < 259 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text


def test_byte_tokenizer_decodes_any_ids(fresh_seed):
  rng = np.random.default_rng(fresh_seed)
  tok = tokenizers.ByteTokenizer()
  assert tok.decode([3 + 0xFF, 3 + 0xC3]) == '\ufffd\ufffd'  # invalid UTF-8 is replaced
  assert tok.decode([-5, 259, 10**9, 3 + ord('a')]) == 'a'  # outside the vocabulary: skipped
  ids = rng.integers(-1000, 1000, size=500)
  assert isinstance(tok.decode(ids), str)
  assert tok.decode([]) == ''


@pytest.fixture(scope='module')
def tiny_sentencepiece(stdlib_data_dir):
  """A SentencePiece model of 384 pieces trained on 30 train documents into the session data dir."""
  from configs import base  # pylint: disable=g-import-not-at-top
  config = base.get_config()
  config.data.data_dir = stdlib_data_dir
  config.data.tokenizer = 'sentencepiece'
  config.data.sentencepiece_vocab_size = 384
  config.data.max_documents = 30
  return config, tokenizers.make_tokenizer(config)


def test_sentencepiece_trains_and_round_trips(tiny_sentencepiece, fresh_seed):
  config, tok = tiny_sentencepiece
  rng = np.random.default_rng(fresh_seed)
  assert isinstance(tok, tokenizers.SentencePieceTokenizer)
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (384, 0, 1, 2)
  validation = sources.load_documents(config, 'validation')
  for index in rng.choice(len(validation), size=3, replace=False):
    text = validation[int(index)]['text'][:3000]
    ids = tok.encode(text)
    assert len(ids) < len(text.encode('utf-8'))  # it learned something beyond bytes
    assert tok.decode(ids) == text
  text = random_unicode(rng, 100) + '\n\n    indented\ttab  '  # byte fallback keeps it exact
  assert tok.decode(tok.encode(text)) == text
  assert isinstance(tok.decode(list(rng.integers(-10, 1000, size=300))), str)
  assert pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)


def test_sentencepiece_is_saved_by_source_and_vocab_and_reused(tiny_sentencepiece, monkeypatch):
  config, tok = tiny_sentencepiece
  path = tokenizers.sentencepiece_model_path(config)
  assert os.path.exists(path)
  assert 'stdlib' in os.path.basename(path) and 'vocab384' in os.path.basename(path)

  def fail(*args, **kwargs):
    raise AssertionError('the saved model should have been reused')

  monkeypatch.setattr(tokenizers, 'train_sentencepiece', fail)
  again = tokenizers.make_tokenizer(config)
  assert again.encode('def f(x):\n  return x\n') == tok.encode('def f(x):\n  return x\n')


def test_sentencepiece_training_is_deterministic(fresh_seed):
  rng = np.random.default_rng(fresh_seed)
  words = ['def', 'return', 'self', 'import', 'class', '    ', '\n', 'if', 'else', 'x', '(', ')']
  text = ' '.join(rng.choice(words, size=20_000))
  documents = [{'text': text}]
  first = tokenizers.train_sentencepiece(tokenizers.training_sentences(documents), 300)
  second = tokenizers.train_sentencepiece(tokenizers.training_sentences(documents), 300)
  assert first == second


def test_sentencepiece_vocab_too_small_names_the_field():
  with pytest.raises(ValueError, match='data.sentencepiece_vocab_size'):
    tokenizers.train_sentencepiece(iter(['abcdefghijklmnopqrstuvwxyz0123456789' * 50]), 270)


def test_unknown_tokenizer_names_the_field(make_config):
  with pytest.raises(ValueError, match='data.tokenizer'):
    tokenizers.make_tokenizer(make_config(tokenizer='words'))
