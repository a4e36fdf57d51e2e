"""Runs survive failures mid-run, resume to the same numbers, and lose nothing.

A real kill -9 at random moments is drilled by scripts/fault_drill.py (subprocesses,
minutes); these tests cover each failure in-process, in seconds.
"""

import errno
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import tiny_config
from rotjax import checkpoint
from rotjax import input_pipeline
from rotjax import metrics
from rotjax import steps
from rotjax import train

from rotjax import run_state

TIMING = ('train_seconds', 'epoch_seconds', 'images_per_second')
two_devices = pytest.mark.skipif(
  jax.local_device_count() < 2, reason='needs 2 devices (XLA_FLAGS)'
)


def _rows(workdir):
  return [
    {k: v for k, v in r.items() if k not in TIMING}
    for r in metrics.read_metrics(str(workdir))
  ]


def _steps(workdir, sub='checkpoints'):
  return sorted(
    int(d) for d in os.listdir(os.path.join(workdir, sub)) if d.isdigit()
  )


@pytest.fixture(scope='module')
def reference(image_folder, tmp_path_factory):
  """An uninterrupted 2-epoch supervised run: (workdir, rows, steps_per_epoch)."""
  workdir = tmp_path_factory.mktemp('reference')
  config = tiny_config('supervised', workdir, image_folder, num_epochs=2)
  train.train_and_evaluate(config)
  dataset = input_pipeline.load_dataset(config.data)
  return workdir, _rows(workdir), -(-len(dataset.train) // config.batch_size)


def _restore_latest(config, workdir):
  dataset = input_pipeline.load_dataset(config.data)
  state, _, _, _ = run_state.create_train_state(config, dataset.num_classes, 1)
  manager = checkpoint.Checkpoints(str(workdir))
  restored = manager.restore_latest(state)
  manager.close()
  return restored


@pytest.mark.slow
def test_kill_between_commit_and_metrics_row_loses_no_row(
  make_config, reference, tmp_path
):
  ref_dir, ref_rows, _ = reference
  workdir = tmp_path / 'run'
  shutil.copytree(ref_dir, workdir)
  # What a kill after epoch 2's checkpoint commit but before its row append leaves.
  lines = open(workdir / 'metrics.jsonl').readlines()
  open(workdir / 'metrics.jsonl', 'w').writelines(lines[:1])
  summary = train.train_and_evaluate(
    make_config('supervised', workdir, num_epochs=2)
  )
  assert _rows(workdir) == ref_rows
  assert summary['epochs'] == 2


def test_kill_between_latest_and_best_commit_rewrites_best(
  make_config, reference, tmp_path
):
  ref_dir, _, steps_per_epoch = reference
  workdir = tmp_path / 'run'
  shutil.copytree(ref_dir, workdir)
  rows = metrics.read_metrics(str(workdir))
  rows[-1]['val_accuracy'] = 2.0  # Make the last epoch the best one...
  open(workdir / 'metrics.jsonl', 'w').writelines(
    json.dumps(r) + '\n' for r in rows
  )
  shutil.rmtree(workdir / 'best')  # ...whose best/ save the kill prevented.
  config = make_config('supervised', workdir, num_epochs=2)
  train.train_and_evaluate(config)
  assert _steps(workdir, 'best') == [2 * steps_per_epoch]
  best = checkpoint.load_variables(str(workdir))['params']
  latest = _restore_latest(config, workdir).params
  np.testing.assert_array_equal(best['fc']['kernel'], latest['fc']['kernel'])


@pytest.mark.slow
def test_nan_loss_stops_with_epoch_and_keeps_last_checkpoint(
  make_config, reference, tmp_path, monkeypatch
):
  _, ref_rows, steps_per_epoch = reference
  original = steps.train_step

  def poisoned(state, batch, rng, **kwargs):
    """The real step, but from epoch 2 on its loss and parameters are NaN."""
    new_state, step_metrics = original(state, batch, rng, **kwargs)
    nan_if_late = lambda x: jnp.where(state.step >= steps_per_epoch, jnp.nan, x)
    new_state = new_state.replace(
      params=jax.tree.map(nan_if_late, new_state.params)
    )
    return new_state, dict(step_metrics, loss=nan_if_late(step_metrics['loss']))

  monkeypatch.setattr(steps, 'train_step', poisoned)
  workdir = tmp_path / 'run'
  config = make_config('supervised', workdir, num_epochs=2)
  with pytest.raises(
    FloatingPointError, match=r'non-finite loss nan at epoch 2, step <= \d+'
  ):
    train.train_and_evaluate(config)
  assert _steps(workdir) == [steps_per_epoch]
  assert [r['epoch'] for r in _rows(workdir)] == [1]
  restored = _restore_latest(config, workdir)
  assert int(restored.step) == steps_per_epoch
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored.params))
  # Fixed (here: unpatched), the same command resumes from epoch 1 and ends as if unbroken.
  monkeypatch.setattr(steps, 'train_step', original)
  train.train_and_evaluate(config)
  assert _rows(workdir) == ref_rows


# What a full disk raises: tensorstore's error (seen on a 1.8 MB tmpfs), or the OS's.
WRITE_ERRORS = [
  ValueError(
    'RESOURCE_EXHAUSTED: Error writing "params.fc.kernel/0" in OCDBT '
    'database: Failed to write 113767 bytes to file'
  ),
  OSError(errno.ENOSPC, 'No space left on device'),
  PermissionError(errno.EACCES, 'Permission denied'),
]


def _fail_after(step_limit, error, monkeypatch):
  """Makes Orbax saves of steps > step_limit leave a partial step and raise `error`."""
  original = ocp.CheckpointManager.save

  def failing(self, step, *args, **kwargs):
    if step <= step_limit:
      return original(self, step, *args, **kwargs)
    os.makedirs(
      os.path.join(
        str(self.directory), f'{step}.orbax-checkpoint-tmp', 'default'
      )
    )
    raise error

  monkeypatch.setattr(ocp.CheckpointManager, 'save', failing)


@pytest.mark.parametrize(
  'error', WRITE_ERRORS, ids=['tensorstore', 'enospc', 'permission']
)
def test_write_error_names_step_and_keeps_earlier_step(
  tmp_path, monkeypatch, error
):
  state = {
    'params': {'w': np.arange(4, dtype=np.float32)},
    'step': np.asarray(1, np.int32),
  }
  manager = checkpoint.Checkpoints(str(tmp_path))
  manager.save(1, state, is_best=True, row={'epoch': 1})
  _fail_after(1, error, monkeypatch)
  with pytest.raises(
    checkpoint.CheckpointWriteError,
    match=f'cannot write checkpoint step 2 under {tmp_path} '
    f'\\({type(error).__name__}: .*earlier checkpoints are intact',
  ):
    manager.save(
      2, dict(state, params={'w': np.zeros(4, np.float32)}), is_best=True
    )
  restored = manager.restore_latest(state)
  np.testing.assert_array_equal(restored['params']['w'], state['params']['w'])
  assert manager.latest_row() == {'epoch': 1}
  manager.close()


@pytest.mark.slow
def test_checkpoint_write_failure_mid_run_keeps_earlier_ones(
  make_config, reference, tmp_path, monkeypatch
):
  _, ref_rows, steps_per_epoch = reference
  error = WRITE_ERRORS[0]
  original = ocp.CheckpointManager.save
  _fail_after(steps_per_epoch, error, monkeypatch)
  workdir = tmp_path / 'run'
  config = make_config('supervised', workdir, num_epochs=2)
  with pytest.raises(
    checkpoint.CheckpointWriteError,
    match=f'cannot write checkpoint step {2 * steps_per_epoch} .*'
    f'{type(error).__name__}.*earlier checkpoints are intact',
  ):
    train.train_and_evaluate(config)
  assert _steps(workdir) == [steps_per_epoch]
  assert [r['epoch'] for r in _rows(workdir)] == [
    1
  ]  # No row for the unsaved epoch.
  assert int(_restore_latest(config, workdir).step) == steps_per_epoch
  monkeypatch.setattr(ocp.CheckpointManager, 'save', original)
  train.train_and_evaluate(config)
  assert (
    _rows(workdir) == ref_rows
  )  # Bit-identical on CPU: same data order, rng, maths.
  assert not [
    d for d in os.listdir(workdir / 'checkpoints') if 'tmp' in d
  ]  # Cleaned up.


@pytest.mark.slow
@two_devices
def test_resume_across_device_counts(make_config, tmp_path):
  workdir = tmp_path / 'run'
  for epochs, devices in ((1, 2), (2, 1), (3, 2)):  # 2 -> 1 -> 2 devices.
    summary = train.train_and_evaluate(
      make_config('supervised', workdir, num_epochs=epochs, num_devices=devices)
    )
    assert summary['epochs'] == epochs
    assert json.load(open(workdir / 'run_info.json'))['num_devices'] == devices
  rows = metrics.read_metrics(str(workdir))
  steps_per_epoch = rows[0]['step']
  assert [(r['epoch'], r['step']) for r in rows] == [
    (e, e * steps_per_epoch) for e in (1, 2, 3)
  ]
  assert _steps(workdir)[-1] == 3 * steps_per_epoch
  assert all(np.isfinite(r['val_loss']) for r in rows)


@pytest.mark.slow
@two_devices
def test_init_from_across_device_counts(make_config, tmp_path):
  # A pretext run on 2 devices feeds a 1-device run, which feeds a 2-device run.
  train.train_and_evaluate(
    make_config('pretext', tmp_path / 'pre', num_epochs=1, num_devices=2)
  )
  chain = (('one', tmp_path / 'pre', 1), ('two', tmp_path / 'one', 2))
  for name, source, devices in chain:
    config = make_config(
      'supervised',
      tmp_path / name,
      num_epochs=1,
      num_devices=devices,
      init_from=str(source),
    )
    train.train_and_evaluate(config)
    info = json.load(open(tmp_path / name / 'run_info.json'))
    assert info['num_devices'] == devices and info['loaded'] > 0
    loaded = checkpoint.load_variables(str(source))['params']
    state, _, _, _ = run_state.create_train_state(config, 3, 1)
    np.testing.assert_array_equal(
      state.params['conv1']['kernel'], loaded['conv1']['kernel']
    )
