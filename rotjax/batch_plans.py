"""Which rows of a split make each batch, decided once for both loaders, and the batches.

A plan (TrainPlan, EpochsPlan, EvalPlan) is a sequence of {rows, mask[, index]}, one per
step: a pure function of (seed, epoch, step), so a run resumed mid-epoch sees the batches
an uninterrupted run would have. `batches` fetches a plan's rows from either loader: an
in-memory split gathers them (memory_loader.Split), a streaming.FileSplit has worker
processes decode them. Knows nothing of rotation or augmentation (they run on device).

No JAX here: the streaming loader's worker processes import this module when they
unpickle the plan whose steps they decode.
"""

from typing import Iterator

import numpy as np

from rotjax import streaming

# Mixes the rows of each batch (with seed, epoch, step); the 4th key entry keeps it apart
# from the shards' orders, keyed on (seed, epoch[, shard]).
_MIX_KEY = 0x6D6978


class TrainPlan:
  """Which rows of a split make each of one epoch's batches (this process's parts of the
  global batches), every example once: a sequence of {rows, mask, index}, one per step.

  Each data shard is shuffled on its own with (seed, epoch, shard), and global
  batch i joins the shards' i-th slices. `split` holds the shards `shards`
  interleaved (shards[j] at positions j::len(shards)), so one process holding
  every shard yields the very batches (the same images at the same `index`) that
  processes holding one shard each assemble. The order depends only on (seed, epoch,
  number of shards): a resumed run sees exactly the batches an uninterrupted one would.

  A shard's last slice, when short, is filled up to the full batch (static shapes:
  nothing recompiles) with its first examples of the epoch again, and `mask` is 0 on
  those rows: the loss gives them weight 0 (steps.train_step). Repeats of real
  images rather than zeros, because the rows still enter that step's BatchNorm
  batch statistics: repeats keep them statistics of training images (a few counted
  twice), where zeros would pull every mean and variance towards black images.
  flax's masked BatchNorm is no way out: it pmean's per-device means, which is
  wrong when devices hold different numbers of real rows (and NaN on a device with none).

  The rows of each shard's part of the batch are then put in a seeded random order, so that
  each device's consecutive part (`shard`) is a uniform random part of it. In index order a
  folder split (listed class by class) would give device 0 mostly the low classes: with
  per-device BatchNorm (model.sync_bn=False) its statistics would carry a label cue that
  evaluation lacks, and results would change with the device count. `index` is each
  row's place in the global batch before that mixing (`first_index` = where this
  process's part starts): augmentation is keyed on it (steps.make_prepare_fn), so one
  device and several still draw the same numbers for each image.

  A Sequence, step i computed when asked for: the streaming loader's workers each build
  the steps they decode, and a resumed run starts at its step.
  """

  def __init__(
    self,
    num_rows: int,
    batch_size: int,
    seed: int,
    epoch: int,
    shards=(0,),
    num_steps: int | None = None,
    first_index: int = 0,
  ):
    self.seed, self.epoch, self.first_index = seed, epoch, first_index
    self.per_shard = batch_size // len(shards)
    self.orders = []
    for j, shard_id in enumerate(shards):
      positions = np.arange(j, num_rows, len(shards))
      # Shard 0 keeps the key (seed, epoch) alone: the order one process has always used,
      # so runs checkpointed before data shards existed resume with the very batches an
      # uninterrupted run of theirs would have seen (fault_drill.py checks resumes bit for bit).
      key = [seed, epoch] if shard_id == 0 else [seed, epoch, shard_id]
      self.orders.append(
        positions[np.random.default_rng(key).permutation(len(positions))]
      )
    if num_steps is None:
      num_steps = -(-max(len(o) for o in self.orders) // self.per_shard)
    self.num_steps = num_steps

  def __len__(self):
    return self.num_steps

  def __getitem__(self, i: int) -> dict:
    if not 0 <= i < self.num_steps:
      raise IndexError(f'step {i} of a {self.num_steps}-step epoch')
    per_shard = self.per_shard
    parts = [_padded_slice(o, i * per_shard, per_shard) for o in self.orders]
    # Each shard's part is mixed by the same permutation, so one process holding every
    # shard feeds each device the very rows that one process per shard would.
    mixed = np.random.default_rng(
      [self.seed, self.epoch, i, _MIX_KEY]
    ).permutation(per_shard)
    index = np.concatenate([j * per_shard + mixed for j in range(len(parts))])
    return {
      'rows': np.concatenate([idx[mixed] for idx, _ in parts]),
      'mask': np.concatenate([mask[mixed] for _, mask in parts]),
      'index': (self.first_index + index).astype(np.int32),
    }


class EpochsPlan:
  """The training batches of several epochs one after another (a TrainPlan each): one
  stream over them keeps its decoding workers from epoch to epoch, and they decode the
  next epoch's first batches while this one is being evaluated."""

  def __init__(
    self,
    num_rows: int,
    batch_size: int,
    seed: int,
    epochs: range,
    shards,
    steps_per_epoch: int,
    first_index: int = 0,
  ):
    self.args = (num_rows, batch_size, seed)
    self.epochs, self.shards, self.first_index = (
      epochs,
      tuple(shards),
      first_index,
    )
    self.steps_per_epoch = steps_per_epoch
    self._last = (
      None  # (epoch, TrainPlan): consecutive steps share their epoch's orders
    )

  def __len__(self):
    return len(self.epochs) * self.steps_per_epoch

  def __getitem__(self, k: int) -> dict:
    epoch = self.epochs[k // self.steps_per_epoch]
    if self._last is None or self._last[0] != epoch:
      num_rows, batch_size, seed = self.args
      self._last = (
        epoch,
        TrainPlan(
          num_rows,
          batch_size,
          seed,
          epoch,
          self.shards,
          self.steps_per_epoch,
          self.first_index,
        ),
      )
    return self._last[1][k % self.steps_per_epoch]


class EvalPlan:
  """Every row of a split once, in order, in batches of `batch_size`, then fully padded
  batches up to `num_batches` (so that every process runs as many steps); rows -1 and
  mask 0 on the padding."""

  def __init__(
    self, num_rows: int, batch_size: int, num_batches: int | None = None
  ):
    self.num_rows, self.batch_size = num_rows, batch_size
    self.num_batches = (
      -(-num_rows // batch_size) if num_batches is None else num_batches
    )

  def __len__(self):
    return self.num_batches

  def __getitem__(self, i: int) -> dict:
    if not 0 <= i < self.num_batches:
      raise IndexError(f'batch {i} of {self.num_batches}')
    rows = i * self.batch_size + np.arange(self.batch_size)
    real = rows < self.num_rows
    return {'rows': np.where(real, rows, -1), 'mask': real.astype(np.float32)}


def batches(split, plan, start: int = 0) -> Iterator[dict]:
  """The batches plan[start:] of `split`: gathered from memory, or streamed from its files
  by worker processes (streaming.FileSplit)."""
  if isinstance(split, streaming.FileSplit):
    return streaming.stream(split, plan, start)
  return (split.gather(plan[i]) for i in range(start, len(plan)))


def train_batches(
  split,
  batch_size: int,
  seed: int,
  epoch: int,
  shards=(0,),
  num_steps: int | None = None,
  first_index: int = 0,
  start: int = 0,
) -> Iterator[dict]:
  """One epoch of training batches (TrainPlan), from step `start` on."""
  plan = TrainPlan(
    len(split), batch_size, seed, epoch, shards, num_steps, first_index
  )
  return batches(split, plan, start)


def _padded_slice(
  order: np.ndarray, start: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
  """order[start:start + size] (sorted: a faster gather of the same set), filled up past the
  end of `order` with its first entries again; (indices, mask), mask 0 on the fill."""
  positions = np.arange(start, start + size)
  idx = order[positions % len(order)]
  mask = (positions < len(order)).astype(np.float32)
  by_index = np.argsort(idx, kind='stable')
  return idx[by_index], mask[by_index]


def epochs_of_batches(
  split,
  batch_size: int,
  seed: int,
  epochs: range,
  shards,
  steps_per_epoch: int,
  first_index: int = 0,
  first_step: int = 0,
):
  """The training batches of `epochs`, from step `first_step` of the first, as one stream
  (EpochsPlan): the loop takes steps_per_epoch of them per epoch. Close it when done."""
  plan = EpochsPlan(
    len(split), batch_size, seed, epochs, shards, steps_per_epoch, first_index
  )
  return batches(split, plan, first_step)


def eval_batches(
  split, batch_size: int, num_batches: int | None = None
) -> Iterator[dict]:
  """Every example once, then fully padded batches up to `num_batches` (EvalPlan); `mask`
  is 0 on the padding (zero images)."""
  return batches(split, EvalPlan(len(split), batch_size, num_batches))


def images_of(split, batch_size: int = 256) -> Iterator[np.ndarray]:
  """The split's images in order, at most `batch_size` at a time: features, predictions and
  statistics over a split that need not fit in memory decoded (row for row with
  split.labels: a skipped unreadable file keeps its place, holding another image)."""
  plan = EvalPlan(len(split), batch_size)
  for i, batch in enumerate(batches(split, plan)):
    yield batch['image'][plan[i]['rows'] >= 0]
