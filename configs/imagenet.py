r"""The five stages, and the study, on ImageNet (1000 classes) or ImageNet-100, streamed.

An ImageNet-layout folder (the ILSVRC2012 train/val images, val sorted into class folders
as torchvision's ImageFolder and the flax example expect):

  ~/data/imagenet/train/n01440764/n01440764_10026.JPEG ...   (1000 or 100 class folders)
  ~/data/imagenet/val/n01440764/ILSVRC2012_val_00000293.JPEG ...

  python -m rotjax.main --config configs/imagenet.py:pretext --config.workdir=runs/in-pre
  python -m rotjax.main --config configs/imagenet.py:finetune \
      --config.init_from=runs/in-pre --config.workdir=runs/in-ft
  python -m rotjax.study --config configs/imagenet.py:study --config.workdir=runs/in-study
  ... --config.data.source=folder:/path/to/imagenet     (another folder)
  ... --config.data.source=tfds:imagenet2012            (tfds, where prepared: docs/data.md)

Every stage streams its images (data.loader=auto picks `stream` for a dataset this size:
input_pipeline.choose_loader) and checkpoints every 1000 steps inside an epoch, so a
killed run resumes where it stopped. The val folder is the test split; model selection
uses 1% of train (data.val_fraction), as the study does on every dataset.

Recipe: ImageNet's usual supervised one (Goyal et al. 2017, the flax example): SGD with
momentum 0.9, learning rate 0.1 per 256 images, 5 warm-up epochs then cosine, weight
decay 1e-4, batch 256, label smoothing 0.1; ResNet18 (or :STAGE,resnet50) with the
ImageNet stem at 224 px. The CIFAR-10 and ImageNette reports used Adam 1e-3; no report
covers ImageNet, and Adam at 1e-3 is not a recipe ResNets reach their ImageNet accuracy
with, so this preset names SGD (configs are data: --config.optim.name=adam to compare).
Epochs: pretext 30 (RotNet's ImageNet schedule is of that order), fine-tune 30,
supervised 90.

Time: not measured on a GPU (none was lent while this was written). The work is about 330
epoch-equivalents of ImageNet (the pretext's 30 epochs see 4 rotations of every image;
fine-tuning layer4+fc costs roughly half an epoch's backward): at R images/s, 330 x 1.28M / R
seconds (ImageNet-100: a tenth). The host must decode as fast as the device trains: the
streaming loader decoded generated 160-500 px JPEGs at ~500 images/s per core on a 2-core
Zen 5 (scripts/benchmark.py --data --folder; real ImageNet JPEGs are larger and decode
slower), so a 16-core host feeds a few thousand images/s. Presets after the stage: `resnet50`,
`in100` (the first 100 classes' folder; only the class count changes: the folder says it).
"""

from configs import common
from configs import finetune
from configs import pretext
from configs import study as study_config
from configs import supervised

STAGE_CONFIGS = {
  'pretext': pretext,
  'finetune': finetune,
  'supervised': supervised,
}
EPOCHS = {'pretext': 30, 'finetune': 30, 'supervised': 90}
SOURCE = 'folder:~/data/imagenet'


def imagenet_data(data) -> None:
  """Dataset fields shared by every ImageNet run (the stages and the study)."""
  data.dataset = 'imagenet'
  data.source = SOURCE
  data.train_split = 'train'
  data.test_split = (
    'val'  # tfds:imagenet2012 calls it 'validation' (found by alias)
  )
  data.preprocess = 'imagenet'
  data.image_size = 224
  data.val_fraction = 0.01  # 12.8k model-selection images carved from train
  data.loader = 'auto'  # streams: 190 GB decoded


def imagenet_recipe(config) -> None:
  """The training fields of the ImageNet recipe (module docstring)."""
  config.model.stem = 'imagenet'
  config.batch_size = 256
  config.eval_batch_size = 512
  config.optim.name = 'sgd'
  config.optim.learning_rate = 0.1 * config.batch_size / 256
  config.optim.momentum = 0.9
  config.optim.weight_decay = 1e-4
  config.optim.warmup_epochs = 5
  config.label_smoothing = 0.1
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 2


def get_config(arg='pretext'):
  parts = (arg or 'pretext').split(',')
  stage, presets = parts[0], parts[1:]
  if stage == 'study':
    return study(presets)
  if stage not in STAGE_CONFIGS:
    raise ValueError(
      f'configs/imagenet.py:{arg}: stage must be one of '
      f'{tuple(STAGE_CONFIGS) + ("study",)}'
    )
  config = STAGE_CONFIGS[stage].get_config()
  imagenet_data(config.data)
  imagenet_recipe(config)
  config.num_epochs = EPOCHS[stage]
  _apply(config, presets)
  return config


def _apply(config, presets) -> None:
  for preset in presets:
    if preset == 'resnet50':
      config.model.name = 'resnet50'
    elif preset == 'in100':
      config.data.source = SOURCE + '-100'
    elif preset == 'smoke':
      common.make_smoke(config)
      config.data.image_size = 32
      config.checkpoint_every_steps = 2
      config.optim.warmup_epochs = 0
    else:
      raise ValueError(
        f'configs/imagenet.py: unknown preset {preset!r}; allowed: resnet50, '
        'in100, smoke'
      )


def study(presets):
  """The five stages on ImageNet, one seed, no sweeps (each sweep is days of GPU time:
  add them with --config.sweeps)."""
  config = study_config.get_config()
  imagenet_data(config.base.data)
  imagenet_recipe(config.base)
  config.base.progress = False
  config.epochs = dict(EPOCHS)
  config.datasets.imagenet = {
    'source': SOURCE,
    'preprocess': 'imagenet',
    'image_size': 224,
    'stem': 'imagenet',
    'test_split': 'val',
  }
  config.axes.dataset = ('imagenet',)
  config.axes.seed = (0,)
  config.sweeps = ()
  for preset in presets:
    if preset == 'smoke':
      study_config._make_smoke(config)
      config.axes.dataset, config.sweeps = ('imagenet',), ()
      config.datasets.imagenet.image_size = 32
      config.base.checkpoint_every_steps = 2
      config.base.optim.warmup_epochs = 0
    elif preset == 'in100':
      config.datasets.imagenet.source = SOURCE + '-100'
    elif preset == 'resnet50':
      config.axes.model = ('resnet50',)
    else:
      raise ValueError(
        f'configs/imagenet.py:study: unknown preset {preset!r}; allowed: '
        'resnet50, in100, smoke'
      )
  return config
