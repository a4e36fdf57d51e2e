"""The study's plan: sweep axes -> the list of runs, and each run's training config.

Pure functions of the study config; nothing here trains or touches the disk.
"""

import dataclasses
import itertools
import os

import ml_collections

from rotjax import rundir

AXES = (
  'dataset',
  'model',
  'num_rotations',
  'label_smoothing',
  'samples_per_class',
  'seed',
  'freeze_bn',
)
# BatchNorm in frozen layers (configs/common.py); only runs with frozen layers depend on it,
# and only other values than this one show in run names, so earlier layouts keep their names.
FREEZE_BN_DEFAULT = 'batch'
# number -> (folder name, train.py stage, starts from the pretext run)
STAGES = {
  1: ('1_pretext', 'pretext', False),
  2: ('2_finetune_pretrained', 'finetune', True),
  3: ('3_finetune_random', 'finetune', False),
  4: ('4_supervised_pretrained', 'supervised', True),
  5: ('5_supervised_random', 'supervised', False),
}


@dataclasses.dataclass(frozen=True)
class Run:
  """One training of the study: a stage at one point of the sweep grid."""

  stage: int
  dataset: str
  model: str
  num_rotations: int
  label_smoothing: float
  samples_per_class: int  # 0 = all labels
  seed: int
  freeze_bn: str = FREEZE_BN_DEFAULT
  # The seed of the pretext run that stages 2 and 4 load: -1 = the run's own seed (the
  # reports: one pretext per seed); k >= 0 = one pretext for every seed (config.pretext_seed),
  # so the spread over seeds measures the downstream training alone, at a third of the cost.
  pretext_seed: int = -1

  def __post_init__(self):
    # Without frozen layers the setting changes nothing: one run (and one name) for all values.
    if not has_frozen_layers(self.stage):
      object.__setattr__(self, 'freeze_bn', FREEZE_BN_DEFAULT)

  @property
  def name(self) -> str:
    return os.path.join(group_name(self), STAGES[self.stage][0])

  @property
  def pretext(self) -> 'Run | None':
    """The pretext run this one is initialised from (None: random init or itself the pretext)."""
    if not STAGES[self.stage][2]:
      return None
    seed = self.seed if self.pretext_seed < 0 else self.pretext_seed
    return dataclasses.replace(self, stage=1, samples_per_class=0, seed=seed)

  def axes(self) -> dict:
    """The sweep coordinates, by axis name."""
    return {axis: getattr(self, axis) for axis in AXES}


def has_frozen_layers(stage: int) -> bool:
  """Stages 2 and 3 train layer4 + fc only (freeze_bn matters to them alone)."""
  return STAGES[stage][1] == 'finetune'


def group_name(run: Run) -> str:
  """Folder of one setting, e.g. cifar10-resnet18-rot4-ls0.1-spcall-seed0[-bnrunning]."""
  spc = run.samples_per_class or 'all'
  bn = '' if run.freeze_bn == FREEZE_BN_DEFAULT else f'-bn{run.freeze_bn}'
  return (
    f'{run.dataset}-{run.model}-rot{run.num_rotations}-ls{run.label_smoothing:g}'
    f'-spc{spc}-seed{run.seed}{bn}'
  )


def _grid(axes: dict, stages, pretext_seed: int = -1) -> list[Run]:
  """Every combination of the axes' values, for each stage."""
  runs = []
  for values in itertools.product(*(tuple(axes[a]) for a in AXES)):
    setting = dict(zip(AXES, values))
    for stage in stages:
      run = Run(stage=stage, pretext_seed=pretext_seed, **setting)
      if (
        stage == 1
      ):  # the pretext sees images only: it never depends on the label count
        run = dataclasses.replace(run, samples_per_class=0)
      runs.append(run)
  return runs


def plan(config) -> list[Run]:
  """Every run of the study, each once, pretext runs before the runs that load them."""
  _check(config)
  axes = {a: config.axes[a] for a in AXES}
  pretext_seed = config.pretext_seed
  runs = _grid(axes, config.stages, pretext_seed)
  for name in config.sweeps:
    preset = config.presets[name].to_dict()
    stages = preset.pop('stages', config.stages)
    runs += _grid({**axes, **preset}, stages, pretext_seed)
  runs += [r.pretext for r in runs if r.pretext is not None]
  unique = {r.name: r for r in runs}
  return sorted(unique.values(), key=lambda r: (r.stage != 1, r.stage, r.name))


def _check(config) -> None:
  if config.pretext_seed < -1:
    raise ValueError(
      f'pretext_seed={config.pretext_seed} must be -1 (each seed its own pretext) '
      'or a seed >= 0 (one pretext for all seeds)'
    )
  for stage in config.stages:
    if stage not in STAGES:
      raise ValueError(
        f'stages={config.stages} has {stage}; allowed: {tuple(STAGES)}'
      )
  for name in config.sweeps:
    if name not in config.presets:
      raise ValueError(
        f'sweeps has {name!r}; presets are {tuple(config.presets)}'
      )
    unknown = set(config.presets[name]) - set(AXES) - {'stages'}
    if unknown:
      raise ValueError(
        f'presets.{name} has {sorted(unknown)}; allowed: {AXES + ("stages",)}'
      )
  for dataset in config.axes.dataset:
    if dataset not in config.datasets:
      raise ValueError(
        f'dataset {dataset!r} has no entry in datasets; known: {tuple(config.datasets)}'
      )


def run_config(config, run: Run) -> ml_collections.ConfigDict:
  """The train.py config of one run: the study's base with the run's axes filled in."""
  _, stage, pretrained = STAGES[run.stage]
  study_dir = rundir.absolute(config.workdir)
  rc = ml_collections.ConfigDict(config.base.to_dict())
  rc.stage = stage
  rc.workdir = os.path.join(study_dir, run.name)
  rc.init_from = os.path.join(study_dir, run.pretext.name) if pretrained else ''
  rc.trainable = (
    tuple(config.finetune_trainable) if stage == 'finetune' else ('all',)
  )
  rc.num_epochs = config.epochs[stage]
  rc.seed = run.seed
  rc.freeze_bn = run.freeze_bn
  rc.label_smoothing = run.label_smoothing
  rc.model.name = run.model
  rc.rotation.num_rotations = run.num_rotations
  settings = config.datasets[run.dataset]
  rc.model.stem = settings.stem
  rc.data.dataset = run.dataset
  for (
    key,
    value,
  ) in (
    settings.items()
  ):  # every other entry is a data field (source, test_split...)
    if key != 'stem':
      rc.data[key] = value
  rc.data.samples_per_class = run.samples_per_class
  return rc
