"""Data x FSDP x tensor parallel (2x2x2) over 8 simulated CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m effjax.main --config=configs/sharded_cpu.py --workdir=/tmp/effjax_2x2x2

Parameters are sharded over 'fsdp' along the model width and over 'tensor' along heads and the MLP
width; the batch over 'data' x 'fsdp'. The loss curve matches configs/default.py's at the same
seed and batch (tested in tests/parallel); only the layout differs.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.mesh.data = 2
  config.mesh.fsdp = 2
  config.mesh.tensor = 2
  return config
