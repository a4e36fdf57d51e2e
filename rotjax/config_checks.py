"""Config checks that run before any compute, each naming the field and what is allowed."""
import os

from rotjax import input_pipeline
from rotjax import models
from rotjax import optim
from rotjax import preprocess
from rotjax import rotation

STAGES = ('pretext', 'finetune', 'supervised')
ROTATION_MODES = ('all', 'random')
DTYPES = ('auto', 'float32', 'bfloat16')


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


def check_config(config) -> None:
  """Everything that can be checked without data or devices."""
  _require(config.stage in STAGES, f'stage={config.stage!r} is unknown; allowed: {STAGES}')
  _require(bool(config.workdir), 'workdir is required: pass --config.workdir=PATH')
  _require(config.model.name in models.MODELS,
           f'model.name={config.model.name!r} is unknown; allowed: {tuple(models.MODELS)}')
  _require(config.model.stem in models.STEMS,
           f'model.stem={config.model.stem!r} is unknown; allowed: {models.STEMS}')
  _require(config.model.width >= 1, f'model.width={config.model.width} must be >= 1')
  _require(config.model.dtype in DTYPES,
           f'model.dtype={config.model.dtype!r} is unknown; allowed: {DTYPES}')
  _require(config.data.dataset in input_pipeline.DATASETS,
           f'data.dataset={config.data.dataset!r} is unknown; allowed: {input_pipeline.DATASETS}')
  kind, path = input_pipeline.parse_source(config.data.source)
  if kind == 'folder':
    _require(os.path.isdir(path), f'data.source folder {path} does not exist')
  _require(config.data.preprocess in preprocess.STYLES,
           f'data.preprocess={config.data.preprocess!r} is unknown; allowed: {preprocess.STYLES}')
  _require(0 <= config.data.val_fraction < 1,
           f'data.val_fraction={config.data.val_fraction} must be in [0, 1)')
  _require(config.data.samples_per_class >= 0,
           f'data.samples_per_class={config.data.samples_per_class} must be >= 0 (0 = all)')
  rotation.check_num_rotations(config.rotation.num_rotations)
  _require(config.rotation.mode in ROTATION_MODES,
           f'rotation.mode={config.rotation.mode!r} is unknown; allowed: {ROTATION_MODES}')
  _require(0 <= config.label_smoothing < 1,
           f'label_smoothing={config.label_smoothing} must be in [0, 1)')
  _require(config.optim.name in optim.OPTIMIZERS,
           f'optim.name={config.optim.name!r} is unknown; allowed: {optim.OPTIMIZERS}')
  _require(config.optim.learning_rate > 0,
           f'optim.learning_rate={config.optim.learning_rate} must be > 0')
  _require(config.num_epochs >= 1, f'num_epochs={config.num_epochs} must be >= 1')
  _require(config.batch_size >= 1 and config.eval_batch_size >= 1,
           'batch_size and eval_batch_size must be >= 1')
  _require(config.log_every_steps >= 1, 'log_every_steps must be >= 1')
  if config.init_from:
    _require(os.path.isdir(os.path.expanduser(config.init_from)),
             f'init_from={config.init_from} does not exist')
  _check_writable(config.workdir)


def _check_writable(workdir: str) -> None:
  workdir = os.path.abspath(os.path.expanduser(workdir))
  parent = workdir
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  target = workdir if os.path.isdir(workdir) else parent
  _require(os.access(target, os.W_OK | os.X_OK), f'workdir={workdir} cannot be written')


def check_batch(config, num_devices: int) -> None:
  for field in ('batch_size', 'eval_batch_size'):
    value = config[field]
    _require(value % num_devices == 0,
             f'{field}={value} is not divisible by the {num_devices} devices')


def check_dataset(config, dataset) -> None:
  _require(len(dataset.train) >= config.batch_size,
           f'batch_size={config.batch_size} is larger than the {len(dataset.train)} training images')
  _require(len(dataset.val) > 0, 'the validation split is empty: raise data.val_fraction')
