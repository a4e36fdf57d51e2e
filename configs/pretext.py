r"""Stage 1: rotation pretext on CIFAR-10 images (labels unused).

  python -m rotjax.main --config configs/pretext.py --config.workdir=runs/pretext \
      --config.data.source=folder:$HOME/.cache/rotjax/cifar10-jpeg
Presets: `:smoke` (seconds, for tests), `:cpu` (narrow ResNet18, a few minutes on 2 cores).
"""

from configs import common


def get_config(arg=None):
  config = common.get_config()
  config.stage = 'pretext'
  config.head = ('fc',)
  config.trainable = ('all',)
  config.num_epochs = 30
  if arg == 'smoke':
    common.make_smoke(config)
  elif arg == 'cpu':
    common.make_cpu(config)
  return config
