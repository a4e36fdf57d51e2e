"""Config checks that run before any compute, each naming the field and what is allowed.

`check_config` needs neither data nor devices nor the machine's abilities; `check_model`
runs once the run's compute is resolved (compute.resolve refuses an insisted oneDNN that
cannot run here, naming why)."""

import os

import jax
import jax.numpy as jnp

from rotjax import compute as compute_lib
from rotjax import data_parallel
from rotjax import freeze
from rotjax import input_pipeline
from rotjax import model_factory
from rotjax import models
from rotjax import optim
from rotjax import preprocess
from rotjax import rotation
from rotjax import rundir

STAGES = ('pretext', 'finetune', 'supervised')
FREEZE_BN = ('batch', 'running', 'reestimated')
ARCHITECTURE = (
  'name',
  'stem',
  'width',
)  # model fields a loaded checkpoint must share
ROTATION_MODES = ('all', 'random')


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


def check_config(config) -> None:
  """Everything that can be checked without data or devices."""
  _require(
    config.stage in STAGES,
    f'stage={config.stage!r} is unknown; allowed: {STAGES}',
  )
  _require(
    bool(config.workdir), 'workdir is required: pass --config.workdir=PATH'
  )
  _require(
    config.model.name in models.MODELS,
    f'model.name={config.model.name!r} is unknown; allowed: {tuple(models.MODELS)}',
  )
  _require(
    config.model.stem in models.STEMS,
    f'model.stem={config.model.stem!r} is unknown; allowed: {models.STEMS}',
  )
  _require(
    config.model.width >= 1, f'model.width={config.model.width} must be >= 1'
  )
  compute_lib.check_names(config.model)
  _require(
    config.data.dataset in input_pipeline.DATASETS,
    f'data.dataset={config.data.dataset!r} is unknown; allowed: {input_pipeline.DATASETS}',
  )
  kind, path = input_pipeline.parse_source(config.data.source)
  if kind == 'folder':
    _require(os.path.isdir(path), f'data.source folder {path} does not exist')
  _require(
    config.data.preprocess in preprocess.STYLES,
    f'data.preprocess={config.data.preprocess!r} is unknown; allowed: {preprocess.STYLES}',
  )
  _require(
    0 <= config.data.val_fraction < 1,
    f'data.val_fraction={config.data.val_fraction} must be in [0, 1)',
  )
  _require(
    config.data.num_shards >= 0,
    f'data.num_shards={config.data.num_shards} must be >= 0 (0 = one per process)',
  )
  _require(
    config.data.samples_per_class >= 0,
    f'data.samples_per_class={config.data.samples_per_class} must be >= 0 (0 = all)',
  )
  rotation.check_num_rotations(config.rotation.num_rotations)
  _require(
    config.rotation.mode in ROTATION_MODES,
    f'rotation.mode={config.rotation.mode!r} is unknown; allowed: {ROTATION_MODES}',
  )
  rotation.check_geometry(
    config.rotation.geometry, config.rotation.num_rotations
  )
  _require(
    0 <= config.label_smoothing < 1,
    f'label_smoothing={config.label_smoothing} must be in [0, 1)',
  )
  _require(
    config.optim.name in optim.OPTIMIZERS,
    f'optim.name={config.optim.name!r} is unknown; allowed: {optim.OPTIMIZERS}',
  )
  _require(
    config.optim.get('schedule', '') in optim.SCHEDULES,
    f'optim.schedule={config.optim.get("schedule", "")!r} is unknown; allowed: '
    f'{optim.SCHEDULES}',
  )
  _require(
    config.optim.learning_rate > 0,
    f'optim.learning_rate={config.optim.learning_rate} must be > 0',
  )
  _require(
    config.num_epochs >= 1, f'num_epochs={config.num_epochs} must be >= 1'
  )
  _require(
    config.batch_size >= 1 and config.eval_batch_size >= 1,
    'batch_size and eval_batch_size must be >= 1',
  )
  _require(config.log_every_steps >= 1, 'log_every_steps must be >= 1')
  _require(
    config.checkpoint_every_steps >= 0,
    f'checkpoint_every_steps={config.checkpoint_every_steps} must be >= 0 '
    '(0 = at epoch ends only)',
  )
  _require(
    config.parallel in data_parallel.MODES,
    f'parallel={config.parallel!r} is unknown; allowed: {data_parallel.MODES}',
  )
  _require(
    config.data.loader in input_pipeline.LOADERS,
    f'data.loader={config.data.loader!r} is unknown; allowed: {input_pipeline.LOADERS}',
  )
  _require(
    config.data.workers >= 0,
    f'data.workers={config.data.workers} must be >= 0 (0 = one per core)',
  )
  _require(
    config.freeze_bn in FREEZE_BN,
    f'freeze_bn={config.freeze_bn!r} is unknown; allowed: {FREEZE_BN}',
  )
  if config.init_from:
    _check_init_from(config)
  _check_writable(config.workdir)


def _check_init_from(config) -> None:
  """A rotjax run (a committed step under checkpoints/ or best/) of this run's architecture."""
  init_from = config.init_from
  try:
    workdir, _ = rundir.find_checkpoint(init_from, 'init_from')
  except FileNotFoundError as e:
    raise ValueError(str(e)) from None
  source = rundir.read_config(workdir)
  _require(
    source is not None,
    f'init_from={init_from} has no config.json naming its model: '
    "cannot check that it has this run's architecture",
  )
  for field in ARCHITECTURE:
    # Loading drops nothing silently: another depth, stem or width is another network.
    _require(
      source.model[field] == config.model[field],
      f'init_from={init_from} was trained with model.{field}={source.model[field]!r}, '
      f'this run has model.{field}={config.model[field]!r}: load a run of the same '
      'architecture',
    )


def check_model(config, compute) -> None:
  """`trainable` names against the model's parameter tree: shapes only, no compute.

  Built with the run's `compute`, so a model.conv=xla run never loads oneDNN, and a
  convolution model.conv=onednn cannot run fails here, before training."""
  model = model_factory.build_model(config, 2, compute)
  size = config.data.image_size
  shapes = jax.eval_shape(
    lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False
    )
  )
  freeze.check_trainable(shapes['params'], config.trainable)


def _check_writable(workdir: str) -> None:
  """Creates workdir and a file in it: os.access says yes to root even on read-only mounts."""
  workdir = rundir.absolute(workdir)
  probe = os.path.join(workdir, f'.write-test-{os.getpid()}')
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ValueError(f'workdir={workdir} cannot be written: {e}') from e


def check_batch(config, num_devices: int, num_shards: int = 1) -> None:
  for field in ('batch_size', 'eval_batch_size'):
    value = config[field]
    _require(
      value % num_devices == 0,
      f'{field}={value} is not divisible by the {num_devices} devices',
    )
  _require(
    config.batch_size % num_shards == 0,
    f'batch_size={config.batch_size} is not divisible by the {num_shards} data shards '
    '(data.num_shards)',
  )


def check_dataset(config, dataset) -> None:
  # A batch larger than the data is fine (one padded step per epoch); an empty shard is not.
  _require(
    dataset.size('train') >= dataset.num_shards,
    f'the {dataset.size("train")} training images do not fill the '
    f'{dataset.num_shards} data shards (data.num_shards / processes)',
  )
  _require(
    dataset.size('val') > 0,
    'the validation split is empty: raise data.val_fraction',
  )
