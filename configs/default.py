"""The default experiment: a 3M-parameter byte-level LM on the Python standard library, on CPU.

    python -m effjax.main --config=configs/default.py --workdir=/tmp/effjax_default

Expect (two CPU cores): the held-out loss falling from ~5.9 (uniform over the byte vocabulary) to
~1.5 nats/byte within about five minutes, then a code-like sample printed at the end.
"""

from configs import base


def get_config():
  config = base.get_config()
  return config
