r"""Stages 4/5: train every layer on CIFAR-10 labels, from init_from or from random init.

  python -m rotjax.main --config configs/supervised.py --config.workdir=runs/supervised \
      --config.data.source=folder:$HOME/.cache/rotjax/cifar10-jpeg [--config.init_from=runs/pretext]
Presets: `:smoke` (seconds, for tests), `:cpu` (a few minutes on 2 cores).
"""

from configs import common


def get_config(arg=None):
  config = common.get_config()
  config.stage = 'supervised'
  config.trainable = ('all',)
  config.num_epochs = 30
  if arg == 'smoke':
    common.make_smoke(config)
  elif arg == 'cpu':
    common.make_cpu(config)
  return config
