r"""The five stages on ImageNette (10 ImageNet classes) with ImageNet-style preprocessing.

The report's settings: ResNet18, ImageNet stem, 224px, batch 16, Adam 1e-3, label smoothing 0.1.
Pick the stage (and a preset) after the colon:

  python -m rotjax.main --config configs/imagenette.py:pretext --config.workdir=runs/inette-pre
  python -m rotjax.main --config configs/imagenette.py:finetune \
      --config.init_from=runs/inette-pre --config.workdir=runs/inette-ft
  # offline, on the copy in ../shared/data (unpacked to ~/.cache/rotjax/imagenette-224):
  ... --config.data.source=folder:~/.cache/rotjax/imagenette-224
Presets: `:STAGE,cpu` (64px, width 16, 3k images: minutes on 2 cores), `:STAGE,smoke`.
"""

from configs import common
from configs import finetune
from configs import pretext
from configs import supervised

STAGE_CONFIGS = {
  'pretext': pretext,
  'finetune': finetune,
  'supervised': supervised,
}


def imagenette_data(config) -> None:
  """Dataset fields shared by every ImageNette run (also used by the study)."""
  config.data.dataset = 'imagenette'
  config.data.source = (
    'tfds:imagenette/320px'  # or imagenette/160px, imagenette/full-size-v2
  )
  config.data.train_split = 'train'
  config.data.test_split = (
    'validation'  # ImageNette's only held-out split ('val' in folders)
  )
  config.data.preprocess = 'imagenet'
  config.data.image_size = 224
  config.model.stem = 'imagenet'


def get_config(arg='pretext'):
  parts = (arg or 'pretext').split(',')
  stage, presets = parts[0], parts[1:]
  if stage not in STAGE_CONFIGS:
    raise ValueError(
      f'configs/imagenette.py:{arg}: stage must be one of {tuple(STAGE_CONFIGS)}'
    )
  config = STAGE_CONFIGS[stage].get_config()
  imagenette_data(config)
  config.batch_size = 16
  config.eval_batch_size = 64
  config.optim.name = 'adam'
  config.optim.learning_rate = 1e-3
  config.label_smoothing = 0.1
  config.log_every_steps = 50
  if 'cpu' in presets:
    config.data.image_size = 64
    config.model.width = 16
    config.batch_size = 64
    config.eval_batch_size = 128
    config.num_epochs = 3
    config.data.max_train_images = 3000
    config.data.max_eval_images = 1000
    config.log_every_steps = 5
  if 'smoke' in presets:
    common.make_smoke(config)
    config.data.image_size = 32
  return config
