import glob
import os

import numpy as np
import pytest

from rotjax import metrics


def _read_events(workdir):
  from tensorboard.backend.event_processing import event_accumulator

  files = glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
  assert files, os.listdir(workdir)
  acc = event_accumulator.EventAccumulator(workdir)
  acc.Reload()
  return {
    tag: [(e.step, e.value) for e in acc.Scalars(tag)]
    for tag in acc.Tags()['scalars']
  }


@pytest.mark.slow
def test_rows_go_to_jsonl_and_tensorboard(tmp_path):
  log = metrics.MetricsLog(str(tmp_path))
  log.write(
    {
      'epoch': 1,
      'step': 4,
      'train_loss': 1.5,
      'val_accuracy': 0.25,
      'test_accuracy': np.float32(0.5),
      'learning_rate': 1e-3,
      'train_accuracy': None,
    }
  )
  log.write(
    {
      'epoch': 2,
      'step': 8,
      'train_loss': 1.0,
      'val_accuracy': 0.5,
      'test_accuracy': 0.75,
      'learning_rate': 1e-3,
    }
  )
  assert [r['step'] for r in metrics.read_metrics(str(tmp_path))] == [4, 8]
  events = _read_events(str(tmp_path))
  assert events['train/loss'] == [(4, 1.5), (8, 1.0)]
  assert events['val/accuracy'] == [(4, 0.25), (8, 0.5)]
  assert events['test/accuracy'] == [(4, 0.5), (8, 0.75)]
  assert 'learning_rate' in events and 'train/accuracy' not in events


def test_writing_events_does_not_import_tensorflow(tmp_path):
  # TensorFlow costs a run's start 10 s on a 2-core CPU and is not on the GPU machines.
  import subprocess, sys

  code = (
    'import sys; from rotjax import metrics; log = metrics.MetricsLog(sys.argv[1]); '
    'log.write({"epoch": 1, "step": 1, "train_loss": 1.0}); log.close(); '
    'print("tensorflow" in sys.modules, "clu" in sys.modules)'
  )
  out = subprocess.run(
    [sys.executable, '-c', code, str(tmp_path)],
    capture_output=True,
    text=True,
    check=True,
  ).stdout.split()
  assert out == ['False', 'False']
  assert _read_events(str(tmp_path))['train/loss'] == [(1, 1.0)]


def test_disabled_log_writes_nothing(tmp_path):
  metrics.MetricsLog(str(tmp_path), enabled=False).write(
    {'epoch': 1, 'step': 1, 'train_loss': 1.0}
  )
  assert os.listdir(tmp_path) == []
