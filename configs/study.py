r"""The study (issue 3): stage 1 rotation pretext, then stages 2-5 from it, over sweeps.

  python -m rotjax.study --config configs/study.py --config.workdir=runs/study
  python -m rotjax.report runs/study
Presets: default (the reports' full study), `:smoke` (tests, seconds), `:cpu` (2 CPU cores).

Runs are the grid of `axes` x `stages`, plus that grid once per named sweep in
`sweeps` (a preset overrides some axes, and may restrict `stages`); duplicates are
trained once, so `sweeps=()` runs the plain grid of `axes`. The first value of each axis is the reference setting
that the other tables hold fixed.

Label smoothing applies to the pretext too (the reports smoothed every stage), so
a pretext run is keyed on (dataset, model, rotations, smoothing, seed); samples
per class only subsets the downstream labels, so those runs share one pretext.
`freeze_bn` only changes runs with frozen layers (stages 2, 3); the others ignore it.
"""
import ml_collections

from configs import common

CIFAR10_FOLDER = 'folder:~/.cache/rotjax/cifar10-jpeg'


def dataset_settings() -> ml_collections.ConfigDict:
  """Per-dataset data/model settings; a new dataset is one more entry here."""
  return ml_collections.ConfigDict({
      'cifar10': {'source': 'tfds:cifar10', 'preprocess': 'cifar', 'image_size': 32,
                  'stem': 'cifar', 'test_split': 'test'},
      # The ImageNette report: ImageNet stem and preprocessing; its held-out split is 'validation'
      # ('val' in the folder copy, found by the same name). CPU runs: --config.datasets.imagenette.
      # image_size=64 --config.datasets.imagenette.source=folder:~/.cache/rotjax/imagenette-224
      'imagenette': {'source': 'tfds:imagenette/320px', 'preprocess': 'imagenet',
                     'image_size': 224, 'stem': 'imagenet', 'test_split': 'validation'},
  })


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.workdir = ''                  # the study's folder; each run gets a sub-folder
  config.base = common.get_config()    # copied into every run, then the run's axes are set
  config.base.progress = False         # the study prints one line per run instead
  config.epochs = ml_collections.ConfigDict({'pretext': 30, 'finetune': 20, 'supervised': 30})
  config.finetune_trainable = ('layer4', 'fc')
  config.datasets = dataset_settings()
  config.stages = (1, 2, 3, 4, 5)      # 2 and 4 need 1, which is added when missing

  config.axes = ml_collections.ConfigDict()
  config.axes.dataset = ('cifar10',)
  config.axes.model = ('resnet18',)
  config.axes.num_rotations = (4,)
  config.axes.label_smoothing = (0.1,)
  config.axes.samples_per_class = (0,)  # 0 = all labels
  config.axes.seed = (0, 1, 2)
  config.axes.freeze_bn = ('batch',)   # BatchNorm in frozen layers (stages 2, 3): batch | running
  # -1: every seed trains its own pretext (the reports); k: all seeds load seed k's pretext.
  config.pretext_seed = -1

  config.presets = ml_collections.ConfigDict({
      'models': {'model': ('resnet18', 'resnet34', 'resnet50')},
      'smoothing': {'label_smoothing': (0.0, 0.1, 0.2)},
      'rotations': {'num_rotations': (4, 6, 8)},
      # The limited-labels report: fine-tuned pretrained (2) vs random init (5).
      'labels': {'samples_per_class': (20, 50, 100, 250, 400, 700, 1000, 0), 'stages': (2, 5)},
      # Frozen layers' BatchNorm: batch statistics (the reports' PyTorch, in .train() mode) or
      # running ones (for stage 3's random init: mean 0, variance 1, layers 1-3 unnormalised).
      'bn': {'freeze_bn': ('batch', 'running'), 'stages': (2, 3)},
      # Error bars on the central claim: fine-tune pretrained (2) vs random init (3).
      'seeds': {'seed': (0, 1, 2), 'stages': (2, 3)},
  })
  config.sweeps = ('models', 'smoothing', 'rotations', 'labels', 'bn')

  if arg == 'smoke':
    _make_smoke(config)
  elif arg == 'cpu':
    _make_cpu(config)
  elif arg:
    raise ValueError(f'unknown study preset {arg!r}; allowed: smoke, cpu')
  return config


def _make_smoke(config) -> None:
  """Seconds: tiny models, 2 epochs, one seed, one value per axis but two label counts."""
  common.make_smoke(config.base)
  config.base.data.max_train_images = 200  # room for 4 labels per class
  config.datasets.cifar10.source = CIFAR10_FOLDER
  config.epochs = ml_collections.ConfigDict({'pretext': 2, 'finetune': 2, 'supervised': 2})
  config.axes.seed = (0,)
  config.presets.labels.samples_per_class = (4, 0)
  config.sweeps = ('labels',)


def _make_cpu(config) -> None:
  """The whole effect on 2 CPU cores in under 45 minutes (estimate below).

  Width-16 ResNet18 (model.dtype=auto: bfloat16 where the CPU has it natively, ~240
  img/s train on a Zen 5 core pair), 8000 train images, val and test capped at 1000,
  4 epochs; stages 1-5 at seed 0, stages 2-3 at seeds 1 and 2 too (all three loading
  the one seed-0 pretext), 100/400 labels per class, and stages 2-3 with
  running-statistics BatchNorm in the frozen layers:
    pretext   8000 x 4 rotations x 4 epochs / 240      ~ 530 s, + eval/compile ~ 600 s
    2,3,4,5   8000 x 4 epochs / 240 = 135 s + ~40 s each ~ 700 s
    seeds     4 more runs of stages 2, 3               ~ 600 s
    labels    (1000 + 4000) x 4 / 240 ~ 85 s + ~80 s, x 2 stages ~ 330 s
    bn        2 more runs of stages 2, 3               ~ 350 s
    rotations 2 more pretext runs (N = 6, 8)            ~ 1200 s
  This estimate predates the disc pretext (one rotation per image per step); measured
  runs are in README's study section.
  """
  config.base.model.width = 16
  config.base.model.dtype = 'auto'
  config.base.batch_size = 128
  config.base.data.max_train_images = 8000
  config.base.data.max_eval_images = 1000
  config.base.log_every_steps = 10
  config.datasets.cifar10.source = CIFAR10_FOLDER
  config.epochs = ml_collections.ConfigDict({'pretext': 4, 'finetune': 4, 'supervised': 4})
  config.axes.seed = (0,)
  config.pretext_seed = 0
  config.presets.labels.samples_per_class = (100, 400, 0)
  # The pretext at N = 4, 6 and 8 on the same footing (same images, disc, epochs); the
  # downstream stages of N = 6 and 8 are left to the full study.
  config.presets.rotations.stages = (1,)
  config.sweeps = ('seeds', 'labels', 'bn', 'rotations')
