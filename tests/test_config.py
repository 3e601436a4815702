"""Bad configs end in one clear error naming the field and what is allowed."""

import subprocess
import sys

import pytest

from configs import base
from effjax.config import ConfigError, validate


def _bad(mutate, match, num_devices=8):
  config = base.get_config()
  mutate(config)
  with pytest.raises(ConfigError, match=match):
    validate(config, num_devices=num_devices)


def test_default_config_is_valid():
  validate(base.get_config(), num_devices=8)


def test_unknown_field_suggests_the_closest_name():
  def typo(c):
    c.model.num_head = 4
  _bad(typo, r'model\.num_head: unknown field; did you mean model\.num_heads\?')


def test_wrong_type():
  def wrong(c):
    with c.ignore_type():  # ConfigDict itself refuses this on the command line
      c.model.d_model = '256'
  _bad(wrong, r"model\.d_model='256': expected int, got str")


def test_value_not_allowed():
  def wrong(c):
    c.model.remat_policy = 'sometimes'
  _bad(wrong, r"model\.remat_policy='sometimes': allowed values are none, full")


def test_heads_must_divide_width():
  def wrong(c):
    c.model.num_heads = 6
    c.model.num_kv_heads = 3
  _bad(wrong, r'model\.num_heads=6: must divide model\.d_model=256')


def test_kv_heads_must_divide_heads():
  def wrong(c):
    c.model.num_kv_heads = 3
  _bad(wrong, r'model\.num_kv_heads=3: must divide model\.num_heads=4')


def test_layers_must_fit_pattern():
  def wrong(c):
    c.model.pattern = 'attention:mlp, attention:mlp'
    c.model.num_layers = 3
  _bad(wrong, r'model\.num_layers=3: must be a multiple of the 2 blocks')


def test_unknown_mixer_in_pattern():
  def wrong(c):
    c.model.pattern = 'atention:mlp'
  _bad(wrong, r"unknown mixer 'atention'; allowed: attention")


def test_batch_not_divisible_by_data_parallel_size():
  def wrong(c):
    c.train.batch_size = 12
  _bad(wrong, r'train\.batch_size=12: each micro-batch \(12 sequences.*batch-parallel size 8')


def test_batch_not_divisible_by_micro_batches():
  def wrong(c):
    c.train.grad_accum_steps = 3
  _bad(wrong, r'train\.batch_size=8: must be divisible by train\.grad_accum_steps=3')


def test_mesh_must_match_devices():
  def wrong(c):
    c.mesh.data = 2
    c.mesh.fsdp = 2
  _bad(wrong, r'mesh: data=2xfsdp=2x.* is 4 devices but 8 are present')


def test_tensor_parallel_must_divide_heads():
  def wrong(c):
    c.mesh.data = 1
    c.mesh.tensor = 8
  _bad(wrong, r'model\.num_heads=4: not divisible by the tensor-parallel size 8')


def test_reserved_axes():
  def wrong(c):
    c.mesh.data = 4
    c.mesh.sequence = 2
  _bad(wrong, r'mesh\.sequence=2: this axis is reserved')


def test_expert_axis_must_divide_the_experts():
  def wrong(c):
    c.model.pattern = 'attention:moe'
    c.model.moe_num_experts = 6
    c.mesh.data = 2
    c.mesh.expert = 4
  _bad(wrong, r'model\.moe_num_experts=6: not divisible by the expert-parallel size 4')


def test_expert_choice_needs_a_capacity():
  def wrong(c):
    c.model.pattern = 'attention:moe'
    c.model.moe_routing = 'expert_choice'
  _bad(wrong, r'model\.moe_capacity_factor=0\.0: expert_choice routing needs a capacity')


def test_sharding_rule_names_a_real_axis():
  def wrong(c):
    c.sharding_rules.mlp = 'tensr'
  _bad(wrong, r"sharding_rules\.mlp='tensr': 'tensr' is not a mesh axis")


def test_command_line_error_is_one_line_and_nonzero(tmp_path):
  cmd = [sys.executable, '-m', 'effjax.main', '--config=configs/default.py',
         f'--workdir={tmp_path}/run', '--config.model.num_heads=5']
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert lines == ['effjax: config error: model.num_heads=5: must divide model.d_model=256 '
                   '(or set model.head_dim explicitly)']
  assert not (tmp_path / 'run').exists()  # nothing was written


def test_command_line_unknown_field(tmp_path):
  cmd = [sys.executable, '-m', 'effjax.main', '--config=configs/default.py',
         f'--workdir={tmp_path}/run', '--config.train.stpes=5']
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.startswith('effjax: config error: train.stpes: unknown field; did you mean '
                                'train.steps? (known fields here: async_checkpointing, batch_size')
  assert len(proc.stderr.strip().splitlines()) == 1


def test_command_line_wrong_type(tmp_path):
  cmd = [sys.executable, '-m', 'effjax.main', '--config=configs/default.py',
         f'--workdir={tmp_path}/run', '--config.model.d_model=wide']
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip() == ("effjax: config error: flag --config.model.d_model=wide: invalid "
                                 "literal for int() with base 10: 'wide'")


def test_missing_config_file(tmp_path):
  cmd = [sys.executable, '-m', 'effjax.main', '--config=configs/no_such_file.py',
         f'--workdir={tmp_path}/run']
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.startswith('effjax: config error: --config could not be loaded')
  assert len(proc.stderr.strip().splitlines()) == 1


def test_cudnn_needs_a_gpu():
  def wrong(c):
    c.model.attention_impl = 'cudnn'
  _bad(wrong, r"model\.attention_impl='cudnn': needs a GPU but the backend is cpu")


def test_decode_attention_tiling_is_checked_with_the_config():
  def wrong(c):
    c.infer.decode_attention_tiling = '64:four'
  _bad(wrong, r"infer\.decode_attention_tiling: decode attention tiling '64:four': SPLIT must be "
              r"a positive integer or 'auto', got 'four'")


def test_vocabulary_must_hold_the_tokenizer():
  def wrong(c):
    c.data.tokenizer = 'sentencepiece'
    c.data.sentencepiece_vocab_size = 4096
  _bad(wrong, r'model\.vocab_size=384: smaller than the sentencepiece tokenizer vocabulary \(4096\)')


def test_recurrent_mixer_fields():
  def head_dim(c):
    c.model.pattern = 'mamba2:mlp'
    c.model.ssm_head_dim = 48
  _bad(head_dim, r'model\.ssm_head_dim=48: must divide the mamba2 inner width')

  def kernel_off_gpu(c):
    c.model.pattern = 'gla:mlp'
    c.model.scan_backend = 'triton'
  _bad(kernel_off_gpu, r"model\.scan_backend='triton': needs a GPU but the backend is cpu")

  def kernel_chunk(c):
    c.model.pattern = 'gla:mlp'
    c.model.scan_backend = 'triton'
    c.model.scan_interpret = True
    c.model.scan_chunk = 48
  _bad(kernel_chunk, r'model\.head_dim / model\.scan_chunk: chunk_size=48 must be a power of two')


def test_file_loading_and_set_overrides_are_typed_and_named():
  """The experiment scripts' --set section.field=value: typed like the field; an unknown field,
  a wrong type or a missing '=' is one ConfigError naming it."""
  import os

  from effjax import config as config_lib
  c = config_lib.load_file(os.path.join(os.path.dirname(os.path.dirname(__file__)),
                                        'configs', 'gpt_1b.py'))
  config_lib.apply_overrides(c, ['model.num_layers=4', 'model.exit_layers=1,2',
                                 'model.scan_layers=True', 'optim.learning_rate=1e-4'])
  assert (c.model.num_layers, c.model.exit_layers, c.model.scan_layers) == (4, '1,2', True)
  assert c.optim.learning_rate == 1e-4
  for bad, message in (('model.num_layer=4', 'did you mean model.num_layers'),
                       ('model.num_layers=0.5', 'not of type int'),
                       ('model.scan_layers=yes', 'not of type bool'), ('model.num_layers', 'expected')):
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.apply_overrides(c, [bad])
  with pytest.raises(FileNotFoundError, match='no such config file'):
    config_lib.load_file('configs/missing.py')
