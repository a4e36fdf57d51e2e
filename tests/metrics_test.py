import glob
import os

import numpy as np

from rotjax import metrics


def _read_events(workdir):
  from tensorboard.backend.event_processing import event_accumulator
  files = glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
  assert files, os.listdir(workdir)
  acc = event_accumulator.EventAccumulator(workdir)
  acc.Reload()
  return {tag: [(e.step, e.tensor_proto) for e in acc.Tensors(tag)] for tag in acc.Tags()['tensors']}


def test_rows_go_to_jsonl_and_tensorboard(tmp_path):
  log = metrics.MetricsLog(str(tmp_path))
  log.write({'epoch': 1, 'step': 4, 'train_loss': 1.5, 'val_accuracy': 0.25,
             'test_accuracy': np.float32(0.5), 'learning_rate': 1e-3, 'train_accuracy': None})
  log.write({'epoch': 2, 'step': 8, 'train_loss': 1.0, 'val_accuracy': 0.5,
             'test_accuracy': 0.75, 'learning_rate': 1e-3})
  assert [r['step'] for r in metrics.read_metrics(str(tmp_path))] == [4, 8]
  import tensorflow as tf
  events = {tag: [(s, float(tf.make_ndarray(v))) for s, v in values]
            for tag, values in _read_events(str(tmp_path)).items()}
  assert events['train/loss'] == [(4, 1.5), (8, 1.0)]
  assert events['val/accuracy'] == [(4, 0.25), (8, 0.5)]
  assert events['test/accuracy'] == [(4, 0.5), (8, 0.75)]
  assert 'learning_rate' in events and 'train/accuracy' not in events


def test_disabled_log_writes_nothing(tmp_path):
  metrics.MetricsLog(str(tmp_path), enabled=False).write({'epoch': 1, 'step': 1, 'train_loss': 1.0})
  assert os.listdir(tmp_path) == []
