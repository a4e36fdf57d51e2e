"""Issue 6: runs survive failures mid-run, resume to the same numbers, and lose nothing.

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
from rotjax import train

TIMING = ('train_seconds', 'epoch_seconds', 'images_per_second')
two_devices = pytest.mark.skipif(jax.local_device_count() < 2, reason='needs 2 devices (XLA_FLAGS)')


def _rows(workdir):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in metrics.read_metrics(str(workdir))]


def _steps(workdir, sub='checkpoints'):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, sub)) if d.isdigit())


@pytest.fixture(scope='module')
def reference(image_folder, tmp_path_factory):
  """An uninterrupted 2-epoch supervised run: (workdir, rows, steps_per_epoch)."""
  workdir = tmp_path_factory.mktemp('reference')
  config = tiny_config('supervised', workdir, image_folder, num_epochs=2)
  train.train_and_evaluate(config)
  dataset = input_pipeline.load_dataset(config.data)
  return workdir, _rows(workdir), len(dataset.train) // config.batch_size


def _restore_latest(config, workdir):
  dataset = input_pipeline.load_dataset(config.data)
  state, _, _, _ = train.create_train_state(config, dataset.num_classes, 1)
  manager = checkpoint.Checkpoints(str(workdir))
  restored = manager.restore_latest(state)
  manager.close()
  return restored


def test_kill_between_commit_and_metrics_row_loses_no_row(make_config, reference, tmp_path):
  ref_dir, ref_rows, _ = reference
  workdir = tmp_path / 'run'
  shutil.copytree(ref_dir, workdir)
  # What a kill after epoch 2's checkpoint commit but before its row append leaves.
  lines = open(workdir / 'metrics.jsonl').readlines()
  open(workdir / 'metrics.jsonl', 'w').writelines(lines[:1])
  summary = train.train_and_evaluate(make_config('supervised', workdir, num_epochs=2))
  assert _rows(workdir) == ref_rows
  assert summary['epochs'] == 2


def test_nan_loss_stops_with_epoch_and_keeps_last_checkpoint(make_config, reference, tmp_path,
                                                             monkeypatch):
  _, ref_rows, steps_per_epoch = reference
  original = train.train_step

  def poisoned(state, batch, rng, **kwargs):
    """The real step, but from epoch 2 on its loss and parameters are NaN."""
    new_state, step_metrics = original(state, batch, rng, **kwargs)
    nan_if_late = lambda x: jnp.where(state.step >= steps_per_epoch, jnp.nan, x)
    new_state = new_state.replace(params=jax.tree.map(nan_if_late, new_state.params))
    return new_state, dict(step_metrics, loss=nan_if_late(step_metrics['loss']))
  monkeypatch.setattr(train, 'train_step', poisoned)
  workdir = tmp_path / 'run'
  config = make_config('supervised', workdir, num_epochs=2)
  with pytest.raises(FloatingPointError, match=r'non-finite loss nan at epoch 2, step <= \d+'):
    train.train_and_evaluate(config)
  assert _steps(workdir) == [steps_per_epoch]
  assert [r['epoch'] for r in _rows(workdir)] == [1]
  restored = _restore_latest(config, workdir)
  assert int(restored.step) == steps_per_epoch
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored.params))
  # Fixed (here: unpatched), the same command resumes from epoch 1 and ends as if unbroken.
  monkeypatch.setattr(train, 'train_step', original)
  train.train_and_evaluate(config)
  assert _rows(workdir) == ref_rows


def test_checkpoint_write_failure_is_loud_and_keeps_earlier_ones(make_config, reference, tmp_path,
                                                                 monkeypatch):
  _, ref_rows, steps_per_epoch = reference
  original = ocp.CheckpointManager.save

  def disk_full(self, step, *args, **kwargs):
    if step <= steps_per_epoch:
      return original(self, step, *args, **kwargs)
    # A partly written step, then the write fails, as on a full disk.
    os.makedirs(os.path.join(str(self.directory), f'{step}.orbax-checkpoint-tmp-1', 'default'))
    raise OSError(errno.ENOSPC, 'No space left on device')
  monkeypatch.setattr(ocp.CheckpointManager, 'save', disk_full)
  workdir = tmp_path / 'run'
  config = make_config('supervised', workdir, num_epochs=2)
  with pytest.raises(OSError, match=f'cannot write checkpoint step {2 * steps_per_epoch} .*'
                                    'No space left on device.*earlier checkpoints are intact'):
    train.train_and_evaluate(config)
  assert _steps(workdir) == [steps_per_epoch]
  assert [r['epoch'] for r in _rows(workdir)] == [1]   # No row for the unsaved epoch.
  assert int(_restore_latest(config, workdir).step) == steps_per_epoch
  monkeypatch.setattr(ocp.CheckpointManager, 'save', original)
  train.train_and_evaluate(config)
  assert _rows(workdir) == ref_rows   # Bit-identical on CPU: same data order, rng, maths.
  assert not [d for d in os.listdir(workdir / 'checkpoints') if 'tmp' in d]   # Cleaned up.


@two_devices
def test_resume_across_device_counts(make_config, tmp_path):
  workdir = tmp_path / 'run'
  for epochs, devices in ((1, 2), (2, 1), (3, 2)):   # 2 -> 1 -> 2 devices.
    summary = train.train_and_evaluate(
        make_config('supervised', workdir, num_epochs=epochs, num_devices=devices))
    assert summary['epochs'] == epochs
    assert json.load(open(workdir / 'run_info.json'))['num_devices'] == devices
  rows = metrics.read_metrics(str(workdir))
  steps_per_epoch = rows[0]['step']
  assert [(r['epoch'], r['step']) for r in rows] == [(e, e * steps_per_epoch) for e in (1, 2, 3)]
  assert _steps(workdir)[-1] == 3 * steps_per_epoch
  assert all(np.isfinite(r['val_loss']) for r in rows)


@two_devices
def test_init_from_across_device_counts(make_config, tmp_path):
  # A pretext run on 2 devices feeds a 1-device run, which feeds a 2-device run.
  train.train_and_evaluate(make_config('pretext', tmp_path / 'pre', num_epochs=1, num_devices=2))
  chain = (('one', tmp_path / 'pre', 1), ('two', tmp_path / 'one', 2))
  for name, source, devices in chain:
    config = make_config('supervised', tmp_path / name, num_epochs=1, num_devices=devices,
                         init_from=str(source))
    train.train_and_evaluate(config)
    info = json.load(open(tmp_path / name / 'run_info.json'))
    assert info['num_devices'] == devices and info['loaded'] > 0
    loaded = checkpoint.load_variables(str(source))['params']
    state, _, _, _ = train.create_train_state(config, 3, 1)
    np.testing.assert_array_equal(state.params['conv1']['kernel'], loaded['conv1']['kernel'])
