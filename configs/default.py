"""The default experiment: a 3M-parameter byte-level LM on the Python standard library, on CPU.

    python -m effjax.main --config=configs/default.py --workdir=/tmp/effjax_default

Expect (two CPU cores, ~4 minutes in all): the loss falling from 5.95 (uniform over the 384 ids)
to ~1.9 train / ~2.2 held-out nats per byte over 240 steps of 2,048 tokens, then a Python-shaped
sample. Measured: experiments/cpu_default/README.md.
"""

from configs import base


def get_config():
  config = base.get_config()
  return config
