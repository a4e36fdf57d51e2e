"""Per-epoch metrics: metrics.jsonl in the workdir (what report and plots read), and
the same scalars as TensorBoard event files beside it (`tensorboard --logdir WORKDIR`)."""

import json
import logging
import os
import socket
import time

import numpy as np

from rotjax import rundir


def _plain(value):
  if isinstance(value, (np.generic, np.ndarray)):
    return value.item()
  return value


class MetricsLog:
  """Appends one JSON object per epoch; on resume, drops rows from epochs not checkpointed."""

  def __init__(
    self, workdir: str, enabled: bool = True, tensorboard: bool = True
  ):
    self.path = rundir.path(workdir, rundir.METRICS)
    self.enabled = enabled
    self.writer = create_writer(workdir) if enabled and tensorboard else None

  def read(self) -> list[dict]:
    return read_metrics(self.path)

  def truncate(self, last_epoch: int) -> None:
    """Keeps rows with epoch <= last_epoch (a killed run may have logged past its checkpoint)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    rows = [r for r in self.read() if r.get('epoch', 0) <= last_epoch]
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      for row in rows:
        f.write(json.dumps(row) + '\n')
    os.replace(tmp, self.path)

  def write(self, row: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({k: _plain(v) for k, v in row.items()}) + '\n')
    if self.writer is not None:
      self.writer.write_scalars(int(row['step']), tensorboard_scalars(row))
      self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
      self.writer = None


class EventWriter:
  """TensorBoard scalars in an event file, written without TensorFlow.

  clu's and tensorboard's own writers import TensorFlow (10 s of a run's start on a
  2-core CPU, and not installed on the GPU machines); an event file is only
  length-prefixed, CRC-checked Event protos, which tensorboard's RecordWriter writes.
  """

  def __init__(self, workdir: str):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer import record_writer

    self._event, self._summary = event_pb2.Event, summary_pb2.Summary
    name = f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}'
    self._file = open(os.path.join(workdir, name), 'wb')
    self._records = record_writer.RecordWriter(self._file)
    self._write(
      self._event(wall_time=time.time(), file_version='brain.Event:2')
    )

  def _write(self, event) -> None:
    self._records.write(event.SerializeToString())

  def write_scalars(self, step: int, scalars: dict) -> None:
    values = [
      self._summary.Value(tag=tag, simple_value=float(v))
      for tag, v in scalars.items()
    ]
    self._write(
      self._event(
        wall_time=time.time(), step=step, summary=self._summary(value=values)
      )
    )

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def create_writer(workdir: str):
  """A TensorBoard event writer, or None (with a warning) where tensorboard is not installed."""
  try:
    return EventWriter(workdir)
  except ImportError as e:
    logging.warning(
      'no TensorBoard event files (%s); metrics.jsonl is still written', e
    )
    return None


def tensorboard_scalars(row: dict) -> dict:
  """{'train_loss': x, ...} -> {'train/loss': x, ...}; non-numbers and epoch/step dropped."""
  scalars = {}
  for key, value in row.items():
    value = _plain(value)
    if (
      key in ('epoch', 'step')
      or isinstance(value, bool)
      or not isinstance(value, (int, float))
    ):
      continue
    prefix, _, rest = key.partition('_')
    scalars[
      f'{prefix}/{rest}' if prefix in ('train', 'val', 'test') else key
    ] = value
  return scalars


def read_metrics(path: str) -> list[dict]:
  """Rows of a metrics.jsonl; a torn last line (killed mid-write) is ignored."""
  if os.path.isdir(path):
    path = os.path.join(path, rundir.METRICS)
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        break
  return rows


def epoch_means(step_metrics: list[dict]) -> dict:
  """train_loss and train_accuracy over the epoch's real images: each step's mean weighed by
  its real rows, so the padded last batch counts for the images it holds, not as a full step."""
  if not step_metrics:
    return {'train_loss': None, 'train_accuracy': None}
  counts = np.asarray([float(m['count']) for m in step_metrics])
  mean = lambda key: float(
    np.sum([float(m[key]) for m in step_metrics] * counts) / np.sum(counts)
  )
  return {'train_loss': mean('loss'), 'train_accuracy': mean('accuracy')}


def summarize(history: list[dict]) -> dict:
  """Best validation accuracy and the test accuracy at that epoch (selection on val, never test)."""
  if not history:
    return {}
  best = max(history, key=lambda r: r['val_accuracy'])
  return {
    'epochs': history[-1]['epoch'],
    'best_epoch': best['epoch'],
    'best_val_accuracy': best['val_accuracy'],
    'test_accuracy': best['test_accuracy'],
    'min_val_loss': min(r['val_loss'] for r in history),
    'final_test_accuracy': history[-1]['test_accuracy'],
    'train_seconds': sum(r['train_seconds'] for r in history),
    'wall_seconds': sum(r['epoch_seconds'] for r in history),
    'images_per_second': float(
      np.median([r['images_per_second'] for r in history])
    ),
  }
