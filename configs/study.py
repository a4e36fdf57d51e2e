r"""The study: stage 1 rotation pretext, then stages 2-5 from it, over sweeps.

  python -m rotjax.study --config configs/study.py --config.workdir=runs/study
  python -m rotjax.report runs/study
Presets: default (the reports' full study), `:smoke` (tests, seconds), `:cpu` (2 CPU cores),
`:cpu_full` (the five stages at the reports' scale on 2 CPU cores, 80 minutes),
`:cpu_full_onecycle` (the same with a one-cycle learning rate: its own workdir),
`:gpu` (the five stages at full scale on one GPU) and its sweeps, one preset each, run in
this order into the same workdir (each reuses the runs the earlier ones finished):
`:gpu_labels`, `:gpu_rotations`, `:gpu_smoothing`, `:gpu_models` (time models in `_make_gpu`).

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
  return ml_collections.ConfigDict(
    {
      'cifar10': {
        'source': 'tfds:cifar10',
        'preprocess': 'cifar',
        'image_size': 32,
        'stem': 'cifar',
        'test_split': 'test',
      },
      # The ImageNette report: ImageNet stem and preprocessing; its held-out split is 'validation'
      # ('val' in the folder copy, found by the same name). CPU runs: --config.datasets.imagenette.
      # image_size=64 --config.datasets.imagenette.source=folder:~/.cache/rotjax/imagenette-224
      'imagenette': {
        'source': 'tfds:imagenette/320px',
        'preprocess': 'imagenet',
        'image_size': 224,
        'stem': 'imagenet',
        'test_split': 'validation',
      },
    }
  )


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.workdir = ''  # the study's folder; each run gets a sub-folder
  config.base = (
    common.get_config()
  )  # copied into every run, then the run's axes are set
  config.base.progress = False  # the study prints one line per run instead
  config.epochs = ml_collections.ConfigDict(
    {'pretext': 30, 'finetune': 20, 'supervised': 30}
  )
  config.finetune_trainable = ('layer4', 'fc')
  config.datasets = dataset_settings()
  config.stages = (1, 2, 3, 4, 5)  # 2 and 4 need 1, which is added when missing

  config.axes = ml_collections.ConfigDict()
  config.axes.dataset = ('cifar10',)
  config.axes.model = ('resnet18',)
  config.axes.num_rotations = (4,)
  config.axes.label_smoothing = (0.1,)
  config.axes.samples_per_class = (0,)  # 0 = all labels
  config.axes.seed = (0, 1, 2)
  # BatchNorm in frozen layers (stages 2, 3): batch | running | reestimated
  config.axes.freeze_bn = ('batch',)
  # -1: every seed trains its own pretext (the reports); k: all seeds load seed k's pretext.
  config.pretext_seed = -1

  config.presets = ml_collections.ConfigDict(
    {
      'models': {'model': ('resnet18', 'resnet34', 'resnet50')},
      'smoothing': {'label_smoothing': (0.0, 0.1, 0.2)},
      'rotations': {'num_rotations': (4, 6, 8)},
      # The limited-labels report: fine-tuned pretrained (2) vs random init (5).
      'labels': {
        'samples_per_class': (20, 50, 100, 250, 400, 700, 1000, 0),
        'stages': (2, 5),
      },
      # Frozen layers' BatchNorm: batch statistics (the reports' PyTorch, in .train() mode) or
      # running ones (for stage 3's random init: mean 0, variance 1, layers 1-3 unnormalised).
      'bn': {'freeze_bn': ('batch', 'running'), 'stages': (2, 3)},
      # Error bars on the central claim: fine-tune pretrained (2) vs random init (3).
      'seeds': {'seed': (0, 1, 2), 'stages': (2, 3)},
    }
  )
  config.sweeps = ('models', 'smoothing', 'rotations', 'labels', 'bn')

  if arg == 'smoke':
    _make_smoke(config)
  elif arg == 'cpu':
    _make_cpu(config)
  elif arg == 'cpu_full':
    _make_cpu_full(config)
  elif arg == 'cpu_full_onecycle':
    _make_cpu_full(config)
    _make_onecycle(config)
  elif arg in GPU_PRESETS:
    _make_gpu(config, GPU_PRESETS[arg])
  elif arg:
    raise ValueError(
      f'unknown study preset {arg!r}; allowed: smoke, cpu, cpu_full, cpu_full_onecycle, {", ".join(GPU_PRESETS)}'
    )
  return config


# :gpu preset -> (the sweep it runs, the stages it trains): every sweep at one seed, on the
# stages that answer its question. Stages 3 and 5 start from random init, so a rotation
# count cannot change them: the rotations sweep trains 1, 2 and 4 only.
GPU_PRESETS = {
  'gpu': ('', (1, 2, 3, 4, 5)),
  'gpu_labels': ('labels', (2, 5)),
  'gpu_rotations': ('rotations', (1, 2, 4)),
  'gpu_smoothing': ('smoothing', (1, 2, 3, 4, 5)),
  'gpu_models': ('models', (1, 2, 3, 4, 5)),
}


def _make_smoke(config) -> None:
  """Seconds: tiny models, 2 epochs, one seed, one value per axis but two label counts."""
  common.make_smoke(config.base)
  config.base.data.max_train_images = 200  # room for 4 labels per class
  config.datasets.cifar10.source = CIFAR10_FOLDER
  config.epochs = ml_collections.ConfigDict(
    {'pretext': 2, 'finetune': 2, 'supervised': 2}
  )
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
  runs are in docs/study.md.
  """
  config.base.model.width = 16
  config.base.model.dtype = 'auto'
  config.base.batch_size = 128
  config.base.data.max_train_images = 8000
  config.base.data.max_eval_images = 1000
  config.base.log_every_steps = 10
  config.datasets.cifar10.source = CIFAR10_FOLDER
  config.epochs = ml_collections.ConfigDict(
    {'pretext': 4, 'finetune': 4, 'supervised': 4}
  )
  config.axes.seed = (0,)
  config.pretext_seed = 0
  config.presets.labels.samples_per_class = (100, 400, 0)
  # The pretext at N = 4, 6 and 8 on the same footing (same images, disc, epochs); the
  # downstream stages of N = 6 and 8 are left to the full study.
  config.presets.rotations.stages = (1,)
  config.sweeps = ('seeds', 'labels', 'bn', 'rotations')


def _make_cpu_full(config) -> None:
  """The reports' table at the reports' scale on 2 CPU cores, in 80 minutes.

  All of CIFAR-10 (the JPEG folder copy: 45,000 train after the seeded 5,000 val images are
  carved out, 10,000 test), ResNet18 width 64, the reports' protocol otherwise: Adam 1e-3
  x0.1 every 10 epochs (so constant 1e-3 at these lengths), label smoothing 0.1, batch 128,
  layer4 + fc for stages 2-3, one seed. What it changes is the number of epochs only:
  3 / 2 / 4 (pretext / fine-tune / supervised) against the reports' 45 / 20 / 45.

  Time model, from the train step measured by scripts/benchmark.py (default bf16 step,
  batch 128; eval batch 256) on 2-core machines: AMX Xeon 2026-12-04: 207 img/s train,
  979 eval; Zen 5 (AVX512-BF16) 2026-11-30: 210 train, ~700 eval. With T the train rate and
  E the eval rate:
    1 pretext     3 x (180,000 rotated images / T + val+test 60,000 / E)   ~ 3 x 930 s = 47 min
    2, 3 finetune 2 x 2 x (45,000 / ~2.5 T (backward stops at layer4) + 15,000 / E) ~  7 min
    4, 5 superv.  2 x 4 x (45,000 / T + 15,000 / E)                         ~ 8 x 235 s = 31 min
    start-up      decoding 60,000 JPEGs once (~2 min; then the .npy cache), ~5 s compile
                  per program from a cold cache, checkpoints                            ~  4 min
    total                                                                               ~ 89 min
  Measured, idle AMX Xeon, 2026-12-05, cold caches (results/cifar10-resnet18-cpu-full):
    1 pretext 3 x 790 s (730 train at 245 rotated img/s + 61 eval) = 39.9 min;
    2, 3 finetune 2 x 136 s (119 + 17) = 4.7 min each; 4, 5 supervised 4 x 227 s
    (210 + 17) = 15.2 min each; decode 14 s, compile 2.6-9.3 s per program, 0.4-1.5 s from
    the cache; total 79.5 min (the model above overestimated rotated-image and eval time).
  Other CPU classes scale by T: AVX2-only CPUs run the fp32 step at ~65 img/s (3.2x
  longer, ~4.7 h); AVX-512 without bf16 at ~114 (1.8x, ~2.7 h). The run resumes where it
  stopped (python -m rotjax.study with the same flags), so a longer one can be split.
  Measured stage times: results/cifar10-resnet18-cpu-full/report.md.
  """
  config.base.batch_size = 128
  config.base.eval_batch_size = 256
  config.base.model.width = 64
  config.base.model.dtype = 'auto'
  config.base.keep_checkpoints = 2
  config.base.log_every_steps = 50
  config.datasets.cifar10.source = CIFAR10_FOLDER
  config.epochs = ml_collections.ConfigDict(
    {'pretext': 3, 'finetune': 2, 'supervised': 4}
  )
  config.axes.seed = (0,)
  config.stages = (1, 2, 3, 4, 5)
  config.sweeps = ()


def _make_onecycle(config) -> None:
  """`:cpu_full` with one change against the reports' protocol: the learning rate of every
  stage follows a one-cycle schedule (optim.schedule=onecycle: from 4e-5 up to the reports'
  1e-3 over the first 30% of the run's steps, then a cosine down to ~0 at its last step)
  in place of the reports' x0.1 every 10 epochs, which at 3-4 epochs never decays. Same
  epochs, batch, data and model, so the same time model as `:cpu_full`; only how far the
  short runs get in it changes. Give it its own workdir: its runs are named as
  `:cpu_full`'s and would be taken for them with another config (stale)."""
  config.base.optim.schedule = 'onecycle'


def _make_gpu(config, preset) -> None:
  """The reports' protocol at full scale on one GPU: ResNet18 (width 64), all of CIFAR-10
  (45,000 train after the 5,000 val images are carved out, 10,000 test), Adam 1e-3 x0.1
  every 10 epochs, label smoothing 0.1, batch 128, one seed, the JPEG folder copy.

  Epochs 30 / 20 / 30 (pretext / fine-tune / supervised), the study's defaults, not the
  reports' 45 / 20 / 45: with x0.1 every 10 epochs the learning rate is 1e-6 from epoch 31
  on, and Adam moves a weight by at most about the learning rate per step, so epochs
  31-45 (15 x 352 steps) move each weight by at most ~0.005 in all, against up to ~3.5 in
  epochs 1-10: they cannot change the result measurably, and would cost 1.5 of the 8
  minutes. `--config.epochs.pretext=45 --config.epochs.supervised=45` gives the reports'.

  Time model, from the H200 figures of ../shared/reference/gpu-first-run.md (pretext
  75,300 images/s counting each of the 4 rotated copies, 2.6 s an epoch wall with
  evaluation; train step 31,900 images/s at batch 128; evaluation 254,000 images/s), on
  an H200-class GPU, compiled programs loaded from the cache (rotjax/compile_cache.py):
    1 pretext     30 x (180,000 / 75,300 = 2.4 s + eval 60,000 / 254,000 = 0.24 s) =  78 s
    2, 3 finetune 2 x 20 x (45,000 / 31,900 = 1.41 s + eval 15,000 / 254,000 = 0.06 s) = 59 s
                  (layer4 + fc train faster than this: the backward pass stops at layer4)
    4, 5 superv.  2 x 30 x 1.47 s                                                     =  88 s
    start-up      decoding the JPEGs once (17 s; then the .npy cache) + ~5 s per run  =  42 s
    total                                                                              ~ 4.5 min
  A cold cache adds the first compiles (at 93aba00: 74 s for the pretext train step,
  ~50 s for the fine-tune one, ~70 s supervised, plus init and evaluation): ~3.5 min,
  8 min in all. Carry the cache folder (ROTJAX_COMPILE_CACHE) to a fresh machine of the
  same kind to start warm. The sweeps, same figures (ResNet34 and 50 scaled by their
  forward FLOPs at 32 px, 1.16 and 1.30 GFLOP against 0.56: estimates, not measurements):
    :gpu_labels     stages 2, 5 at 20..1000 labels per class (25,200 images over the 7
                    counts): 20 and 30 epochs of 0.8 s train + 0.2 s eval/checkpoint over
                    them, + 14 starts                                              ~ 2.5 min
    :gpu_rotations  N = 6, 8: pretext 30 x (3.6 + 0.35) s and 30 x (4.8 + 0.47) s, then
                    stages 2, 4 of each (50 epochs x 1.47 s)                        ~ 7.5 min
    :gpu_smoothing  0 and 0.2: the five stages twice                                ~ 8 min
    :gpu_models     ResNet34 (x2.1) and ResNet50 (x2.3): the five stages each      ~ 20 min
  Each adds its first compiles where the cache is cold (the new shapes of N = 6, 8 and of
  the deeper models).
  """
  sweep, stages = preset
  config.base.batch_size = 128
  config.base.eval_batch_size = 1024
  config.base.model.dtype = 'auto'
  config.base.keep_checkpoints = 2
  config.base.log_every_steps = 50
  config.datasets.cifar10.source = CIFAR10_FOLDER
  config.epochs = ml_collections.ConfigDict(
    {'pretext': 30, 'finetune': 20, 'supervised': 30}
  )
  config.axes.seed = (0,)
  config.stages = stages
  config.sweeps = (sweep,) if sweep else ()
  if sweep:
    config.presets[sweep].stages = stages
