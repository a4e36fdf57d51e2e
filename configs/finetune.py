r"""Stages 2/3: train only layer4 + fc on CIFAR-10 labels; the rest stays frozen.

  python -m rotjax.main --config configs/finetune.py --config.init_from=runs/pretext \
      --config.workdir=runs/finetune --config.data.source=folder:$HOME/.cache/rotjax/cifar10-jpeg
Without init_from this is stage 3 (same freeze, random init).
Presets: `:smoke` (seconds, for tests), `:cpu` (a few minutes on 2 cores).
"""

from configs import common


def get_config(arg=None):
  config = common.get_config()
  config.stage = 'finetune'
  config.trainable = ('layer4', 'fc')
  config.num_epochs = 20
  if arg == 'smoke':
    common.make_smoke(config)
  elif arg == 'cpu':
    common.make_cpu(config)
  return config
