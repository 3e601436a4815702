"""Document sources: the stdlib dataset, text files by glob, tfds by name; splits by path hash."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from effjax.data import sources
from effjax.data.stdlib_corpus import stdlib_corpus_dataset_builder as stdlib_corpus


def ids_of(documents) -> list[str]:
  return [documents[i]['id'] for i in range(len(documents))]


def test_stdlib_splits_are_disjoint_complete_and_follow_the_path_hash(make_config):
  config = make_config(max_documents=0)
  train = ids_of(sources.load_documents(config, 'train'))
  validation = ids_of(sources.load_documents(config, 'validation'))
  assert not set(train) & set(validation)
  all_files = [relative for relative, _ in stdlib_corpus.stdlib_python_files()]
  assert sorted(train + validation) == all_files
  assert 300 < len(all_files) < 5000  # trimmed Python images ship fewer files (no test suite)
  assert not any('site-packages' in path for path in all_files)
  assert all(sources.in_validation_split(p, 2) for p in validation)
  assert not any(sources.in_validation_split(p, 2) for p in train)
  assert 0 < len(validation) < 0.05 * len(all_files)
  # The same again: a second read gives the same documents in the same order.
  assert ids_of(sources.load_documents(config, 'train')) == train


def test_stdlib_dataset_is_named_by_python_version_and_not_rebuilt(make_config, monkeypatch):
  config = make_config()
  tag = f'python{sys.version_info.major}_{sys.version_info.minor}'
  assert stdlib_corpus.dataset_name(2) == f'stdlib_corpus/{tag}_validation2:1.0.0'
  assert os.path.isdir(os.path.join(config.data.data_dir, 'stdlib_corpus', f'{tag}_validation2'))

  def fail(*args, **kwargs):
    raise AssertionError('the prepared dataset should have been reused')

  monkeypatch.setattr(stdlib_corpus.Builder, 'download_and_prepare', fail)
  document = sources.load_documents(config, 'train')[0]
  assert document['text'] and document['id'].endswith('.py')


def test_max_documents_caps_deterministically(make_config):
  config = make_config(max_documents=7)
  capped = ids_of(sources.load_documents(config, 'train'))
  assert len(capped) == 7
  assert capped == ids_of(sources.load_documents(make_config(max_documents=0), 'train'))[:7]


def test_two_processes_building_at_once_both_get_the_whole_dataset(tmp_path):
  script = textwrap.dedent(f"""
      from configs import base
      from effjax.data import sources
      config = base.get_config()
      config.data.data_dir = {str(tmp_path)!r}
      config.data.validation_percent = 5  # a config no other test builds
      documents = sources.load_documents(config, 'train')
      print(len(documents), len(sources.load_documents(config, 'validation')))
  """)
  env = dict(os.environ,
             PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get('PYTHONPATH', '')]))
  procs = [subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
  outputs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-2000:]
  counts = [out.split()[-2:] for out, _ in outputs]
  assert counts[0] == counts[1]
  assert int(counts[0][0]) + int(counts[0][1]) == len(stdlib_corpus.stdlib_python_files())


def write_text_files(root, rng: np.random.Generator, count: int) -> dict[str, str]:
  texts = {}
  for i in range(count):
    relative = os.path.join(f'dir{i % 3}', f'sub{i % 2}', f'doc{i}.txt')
    path = os.path.join(root, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    vocabulary = ['alpha', 'beta', 'gamma', 'delta', 'épsilon', '日本']
    words = rng.choice(vocabulary, size=rng.integers(1, 300))
    texts[relative] = f'document {i}: ' + ' '.join(words)
    with open(path, 'w', encoding='utf-8') as f:
      f.write(texts[relative])
  with open(os.path.join(root, 'ignored.bin'), 'w') as f:
    f.write('not matched by the glob')
  return texts


def test_text_files_by_glob(make_config, tmp_path, fresh_seed):
  rng = np.random.default_rng(fresh_seed)
  texts = write_text_files(tmp_path, rng, 60)
  config = make_config(source='text_files', glob=str(tmp_path / '**' / '*.txt'),
                       validation_percent=20, max_documents=0)
  train = sources.load_documents(config, 'train')
  validation = sources.load_documents(config, 'validation')
  train_ids, validation_ids = ids_of(train), ids_of(validation)
  assert not set(train_ids) & set(validation_ids)
  assert sorted(train_ids + validation_ids) == sorted(texts)
  assert all(sources.in_validation_split(p, 20) for p in validation_ids)
  assert 0 < len(validation_ids) < len(train_ids)
  for documents in (train, validation):
    for i in range(len(documents)):
      assert documents[i]['text'] == texts[documents[i]['id']]


def test_text_files_glob_matching_nothing_names_the_glob(make_config, tmp_path):
  pattern = str(tmp_path / 'nothing' / '*.txt')
  config = make_config(source='text_files', glob=pattern)
  with pytest.raises(ValueError, match='data.glob=.*nothing'):
    sources.load_documents(config, 'train')
  with pytest.raises(ValueError, match='data.glob'):
    sources.load_documents(make_config(source='text_files', glob=''), 'train')


def test_tfds_dataset_not_available_names_the_field(make_config):
  config = make_config(source='tfds', tfds_name='lm1b:1.1.0')
  with pytest.raises(ValueError, match=r"data\.tfds_name='lm1b:1.1.0'"):
    sources.load_documents(config, 'train')
  with pytest.raises(ValueError, match='data.tfds_name'):
    sources.load_documents(make_config(source='tfds', tfds_name=''), 'train')


def test_tfds_by_name_reads_a_prepared_array_record_dataset(make_config):
  # The stdlib dataset is a tfds dataset prepared as array_record under the data dir: the 'tfds'
  # source must read it by name like any other.
  config = make_config(source='tfds', tfds_name=stdlib_corpus.dataset_name(2),
                       tfds_eval_split='validation', max_documents=0)
  stdlib = make_config(max_documents=0)
  train = sources.load_documents(config, 'train')
  assert len(train) == len(sources.load_documents(stdlib, 'train'))
  assert train[3]['text'] == sources.load_documents(stdlib, 'train')[3]['text']
  assert train[3]['id'] == 'train/3'
  validation = sources.load_documents(config, 'validation')
  assert len(validation) == len(sources.load_documents(stdlib, 'validation'))


def test_unknown_source_names_the_field(make_config):
  with pytest.raises(ValueError, match='data.source'):
    sources.load_documents(make_config(source='web'), 'train')


def test_data_dir_defaults(make_config, monkeypatch):
  config = make_config(data_dir='')
  monkeypatch.setenv('EFFJAX_DATA_DIR', '/some/where')
  assert sources.data_dir(config) == '/some/where'
  monkeypatch.delenv('EFFJAX_DATA_DIR')
  assert sources.data_dir(config) == os.path.expanduser('~/.cache/effjax')
