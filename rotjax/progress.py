"""A per-epoch progress bar: step, loss, accuracy, images/s and ETA."""

import logging
import time

import tqdm


class EpochBar:
  """tqdm bar refreshed at logging intervals (each refresh is a host sync)."""

  def __init__(self, epoch, num_epochs, steps, images_per_step, enabled=True):
    self.epoch, self.num_epochs, self.images_per_step = (
      epoch,
      num_epochs,
      images_per_step,
    )
    self.start, self.last = time.time(), 0
    self.bar = tqdm.tqdm(
      total=steps,
      desc=f'epoch {epoch}/{num_epochs}',
      unit='step',
      dynamic_ncols=True,
      disable=not enabled,
      leave=True,
    )

  def update(self, step, metrics):
    rate = step * self.images_per_step / max(time.time() - self.start, 1e-9)
    self.bar.update(step - self.last)
    self.last = step
    self.bar.set_postfix(
      loss=f'{float(metrics["loss"]):.3f}',
      acc=f'{float(metrics["accuracy"]):.3f}',
      img_s=f'{rate:.0f}',
    )

  def close(self, row):
    self.bar.close()
    train = (
      ''
      if row['train_loss'] is None
      else (
        f'train loss {row["train_loss"]:.4f} acc {row["train_accuracy"]:.4f} | '
      )
    )
    logging.info(
      'epoch %d/%d: %sval loss %.4f acc %.4f | test loss %.4f acc %.4f | %.0f img/s',
      self.epoch,
      self.num_epochs,
      train,
      row['val_loss'],
      row['val_accuracy'],
      row['test_loss'],
      row['test_accuracy'],
      row['images_per_second'],
    )
