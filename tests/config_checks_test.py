"""Every bad config fails before any training compute, naming the field and what is allowed."""

import os

import pytest

from conftest import two_devices
from rotjax import run_state
from rotjax import train


def _not_a_run(tmp_path):
  os.makedirs(tmp_path / 'other' / 'checkpoints')
  (tmp_path / 'other' / 'config.json').write_text('{}')
  return str(tmp_path / 'other')


def _under_a_file(tmp_path):
  (tmp_path / 'a_file').write_text('')
  return str(tmp_path / 'a_file' / 'run')


# (id, stage, overrides: dict or tmp_path -> dict, message regex)
CASES = [
  (
    'stage',
    'supervised',
    {'stage': 'pretrain'},
    r"stage='pretrain' is unknown; allowed",
  ),
  (
    'model',
    'supervised',
    {'model.name': 'resnet99'},
    r"model.name='resnet99' is unknown; allowed: \('resnet18'",
  ),
  (
    'stem',
    'supervised',
    {'model.stem': 'tiny'},
    r"model.stem='tiny' is unknown; allowed",
  ),
  (
    'dataset',
    'supervised',
    {'data.dataset': 'mnist'},
    r"data.dataset='mnist' is unknown; allowed: \('cifar10'",
  ),
  (
    'source',
    'supervised',
    {'data.source': 'http://x'},
    r"data.source='http://x' is unknown; allowed: \"tfds:NAME\" or \"folder:PATH\"",
  ),
  (
    'source_folder',
    'supervised',
    lambda t: {'data.source': f'folder:{t}/nope'},
    r'data.source folder .*nope does not exist',
  ),
  (
    'num_rotations',
    'pretext',
    {'rotation.num_rotations': 5},
    r'rotation.num_rotations=5 is not supported; allowed: \(4, 6, 8\)',
  ),
  (
    'rotation_mode',
    'pretext',
    {'rotation.mode': 'some'},
    r"rotation.mode='some' is unknown; allowed",
  ),
  (
    'rotation_geometry',
    'pretext',
    {'rotation.num_rotations': 8, 'rotation.geometry': 'square'},
    r"rotation.geometry='square' needs num_rotations=4",
  ),
  (
    'smoothing_one',
    'supervised',
    {'label_smoothing': 1.0},
    r'label_smoothing=1.0 must be in \[0, 1\)',
  ),
  (
    'smoothing_negative',
    'supervised',
    {'label_smoothing': -0.1},
    r'label_smoothing=-0.1 must be in \[0, 1\)',
  ),
  (
    'batch_size',
    'supervised',
    {'batch_size': 7},
    r'batch_size=7 is not divisible by the 2 devices',
  ),
  (
    'eval_batch_size',
    'supervised',
    {'eval_batch_size': 5},
    r'eval_batch_size=5 is not divisible by the 2 devices',
  ),
  (
    'num_devices',
    'supervised',
    {'num_devices': 3},
    r'num_devices=3 but only 2 local devices exist',
  ),
  (
    'samples_per_class',
    'supervised',
    {'data.samples_per_class': 100},
    r'data.samples_per_class=100 is larger than class 0 has \(\d+',
  ),
  (
    'init_from_missing',
    'finetune',
    lambda t: {'init_from': f'{t}/nope'},
    r'init_from=.*nope does not exist',
  ),
  (
    'init_from_not_a_run',
    'finetune',
    lambda t: {'init_from': _not_a_run(t)},
    r'init_from=.*other has no complete checkpoint',
  ),
  (
    'trainable',
    'finetune',
    {'trainable': ('layer9', 'fc')},
    r"trainable name 'layer9' matches no parameter; top-level subtrees are \['bn1', 'conv1', 'fc'",
  ),
  (
    'workdir_under_file',
    'supervised',
    lambda t: {'workdir': _under_a_file(t)},
    r'workdir=.*a_file/run cannot be written',
  ),
  # Root may write anywhere os.access asks about, but not into procfs.
  (
    'workdir_readonly',
    'supervised',
    {'workdir': '/proc/rotjax-run'},
    r'workdir=/proc/rotjax-run cannot be written',
  ),
  (
    'learning_rate',
    'supervised',
    {'optim.learning_rate': 0.0},
    r'optim.learning_rate=0.0 must be > 0',
  ),
  (
    'parallel',
    'supervised',
    {'parallel': 'gspmd'},
    r"parallel='gspmd' is unknown; allowed: \('auto', 'jit', 'pmap'\)",
  ),
  (
    'schedule',
    'supervised',
    {'optim.schedule': 'linear'},
    r"optim.schedule='linear' is unknown; allowed",
  ),
]


# These messages name the 2 devices the CPU suite forces; one device divides any batch.
NEEDS_TWO_DEVICES = ('batch_size', 'eval_batch_size', 'num_devices')


@pytest.mark.parametrize(
  'stage,overrides,message',
  [
    pytest.param(
      *c[1:], id=c[0], marks=[two_devices] if c[0] in NEEDS_TWO_DEVICES else []
    )
    for c in CASES
  ],
)
def test_bad_config_fails_before_compute(
  make_config, tmp_path, monkeypatch, stage, overrides, message
):
  def no_compute(*args, **kwargs):
    raise AssertionError(
      'training compute started before the config was checked'
    )

  monkeypatch.setattr(run_state, 'create_train_state', no_compute)
  if callable(overrides):
    overrides = overrides(tmp_path)
  config = make_config(stage, tmp_path / 'run')
  for (
    key,
    value,
  ) in overrides.items():  # Not as kwargs: 'stage' is one of the keys.
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config)
