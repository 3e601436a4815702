"""The early-exit study's model (experiments/early_exit): 6 layers with exits after 2 and 4, CPU.

    python -m effjax.main --config=configs/early_exit.py --workdir=/tmp/effjax_early_exit
    python -m effjax.main --config=configs/early_exit.py --workdir=/tmp/effjax_early_exit \
        --mode=generate --config.infer.method=early_exit --config.infer.exit_tolerance=0.05

The default 3M-parameter byte-level model made 6 layers deep (4.7M parameters), each exit with
its own RMSNorm before the shared (tied) output projection, exit losses weighted linearly in
depth (1/3 and 2/3 of the final loss's weight). Expect about 6 minutes on two CPU cores; the
held-out per-exit losses are logged as eval/exit2_loss and eval/exit4_loss. Results:
experiments/early_exit/README.md.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.num_layers = 6
  config.model.exit_layers = '2,4'
  config.model.exit_head = 'norm'
  config.train.exit_loss_schedule = 'linear'
  config.train.exit_loss_scale = 1.0
  config.train.eval_every = 0
  config.generate.at_end = False
  return config
