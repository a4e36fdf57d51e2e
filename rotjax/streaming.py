"""The streaming loader: a split kept as file names, its batches decoded in worker processes.

For datasets larger than memory (ImageNet: 190 GB decoded). batch_plans decides which
rows make each batch (its TrainPlan / EvalPlan, the same for both loaders); here those
rows are read from disk by Grain worker processes (`grain` on PyPI: deterministic order,
one process per core, prefetch through shared memory) while the device trains on the
previous batches. Each image goes through image_files.decode_image, as the memory
loader's do: for the same plan the two loaders give identical batches.

Where it runs: worker processes import this module, image_files, numpy and PIL (no JAX).
"""

import dataclasses
import gc
import inspect
import itertools
import logging
import multiprocessing
import os
import signal
import threading
import time
from typing import Iterator, Sequence

import numpy as np

from rotjax import image_files
from rotjax import shared_ring

# Batches each worker decodes ahead of the one being trained on.
PER_WORKER_BUFFER = 2


class DataWorkerError(RuntimeError):
  """A decoding worker process died (killed, out of memory, a crash in a native library)."""


@dataclasses.dataclass
class FileSplit:
  """A split as files (or tfds record numbers) and labels; images are decoded when a
  batch needs them."""

  files: list  # paths; record numbers where `reader` is a TfdsReader
  labels: np.ndarray  # int32 [N]
  size: int  # side of the decoded square (input_pipeline.storage_size)
  skip_bad_files: bool = False
  workers: int = 0  # decoding processes (0: one per core this process may use)
  name: str = ''  # for messages: ROOT/SPLIT
  reader: object = (
    None  # (file, size) -> uint8 square; None: image_files.read_image
  )

  def __len__(self):
    return len(self.labels)

  def take(self, indices) -> 'FileSplit':
    return dataclasses.replace(
      self, files=[self.files[i] for i in indices], labels=self.labels[indices]
    )

  def read(self, row: int) -> np.ndarray | None:
    """Row `row` decoded to a uint8 square; None where the file is unreadable and
    skip_bad_files (else the BadImageError naming it). Both loaders decode through here."""
    try:
      return (self.reader or image_files.read_image)(self.files[row], self.size)
    except image_files.BadImageError:
      if not self.skip_bad_files:
        raise
      return None

  def gather(self, plan: dict, out: np.ndarray | None = None) -> dict:
    """One batch of `plan` (rows: indices into this split, -1 = padding), decoded here
    (into `out` where given: a slot of the workers' shared ring).

    An unreadable file is a BadImageError naming it; with skip_bad_files its row gets
    mask 0 and another image of the batch (so BatchNorm's batch statistics stay those of
    real images, as for the padding), and its name goes back in 'skipped'.
    """
    rows = np.asarray(plan['rows'])
    shape = (len(rows), self.size, self.size, 3)
    images = np.zeros(shape, np.uint8) if out is None else out
    mask = np.array(plan['mask'], np.float32)
    bad = []
    for j, row in enumerate(rows):
      if row < 0:
        if out is not None:
          images[j] = 0  # a reused buffer holds an earlier batch's pixels
        continue
      image = self.read(row)
      if image is None:
        bad.append(j)
      else:
        images[j] = image
    if bad:
      mask = mask_unreadable(images, mask, rows, bad)
    labels = np.where(rows >= 0, self.labels[np.maximum(rows, 0)], 0).astype(
      np.int32
    )
    extra = {k: v for k, v in plan.items() if k not in ('rows', 'mask')}
    return {
      'image': images,
      'label': labels,
      'mask': mask,
      **extra,
      'skipped': tuple(str(self.files[rows[j]]) for j in bad),
    }


def mask_unreadable(images, mask, rows, bad) -> np.ndarray:
  """`mask` with the batch positions `bad` (unreadable files) at weight 0, their images
  replaced in place by the batch's first readable one (so BatchNorm's batch statistics stay
  those of real images, as for the padding). Both loaders mask through here, so a run's
  batches do not depend on data.loader."""
  mask = np.array(mask, np.float32)
  good = np.flatnonzero((rows >= 0) & ~np.isin(np.arange(len(rows)), bad))
  for j in bad:
    mask[j] = 0.0
    if len(good):
      images[j] = images[good[0]]
  return mask


_watching_parent = False


def _exit_with_parent() -> None:
  """In a worker process: end it when the process that started it is gone (killed with
  SIGKILL, say), instead of leaving an orphan that holds its memory. A thread checks
  every second; the process that started it stays the parent for as long as it lives."""
  global _watching_parent
  parent = multiprocessing.parent_process()
  if _watching_parent or parent is None:
    return
  _watching_parent = True
  parent_pid = (
    parent.pid
  )  # not getppid(): the parent may already be gone (reparented)

  def watch():
    while os.getppid() == parent_pid:
      time.sleep(1.0)
    os._exit(1)

  threading.Thread(
    target=watch, daemon=True, name='rotjax-exit-with-parent'
  ).start()


def _init_worker(index: int, count: int) -> None:
  """Grain runs this first in each decoding worker (its worker_init_fn). Not at import:
  a worker that re-imports a script's main module (spawn does, and with it any rotjax
  module the script imports at its top) does so before multiprocessing knows its parent.

  Ctrl-C (SIGINT to the whole process group) is the trainer's to handle: it stops its
  workers, rather than each worker printing a KeyboardInterrupt traceback as it dies.
  SIGTERM keeps its default: multiprocessing ends daemon workers with it at exit.
  """
  del index, count
  _exit_with_parent()
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def available_cores() -> int:
  """Cores this process may run on (its affinity mask: a container or taskset limit counts)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS
    return os.cpu_count() or 1


def num_workers(requested: int, num_batches: int) -> int:
  """Worker processes for `num_batches` batches: `requested`, or one per core (0), never
  more than there are batches."""
  return max(1, min(requested or available_cores(), num_batches))


_attached = {}  # in a worker: ring name -> (SharedMemory, header)


class _DecodeIntoRing:
  """What each worker runs per batch: wait for its slot, decode into it, return the rest."""

  def __init__(self, split: FileSplit, name: str, slots: int, shape: tuple):
    self.split, self.name, self.slots, self.shape = split, name, slots, shape

  def __call__(self, item) -> dict:
    number, plan = item
    if self.name not in _attached:
      from multiprocessing import shared_memory

      # Attaching registers the block with the resource tracker this worker shares with
      # the training process; that process unlinks it (and unregisters it) when done.
      shm = shared_memory.SharedMemory(name=self.name)
      _attached[self.name] = (shm, np.ndarray((2,), np.int64, shm.buf))
    shm, header = _attached[self.name]
    if not shared_ring.wait_for_slot(header, number, self.slots):
      return {
        'number': number,
        'stopped': True,
      }  # nobody reads it: the stream is closing
    slot_bytes = int(np.prod(self.shape))
    out = np.ndarray(
      self.shape,
      np.uint8,
      shm.buf,
      shared_ring.HEADER + (number % self.slots) * slot_bytes,
    )
    batch = self.split.gather(plan, out=out)
    del batch['image'], out
    return {**batch, 'number': number}


class _Gather:
  def __init__(self, split):
    self.split = split

  def __call__(self, item):
    return self.split.gather(item[1])


class _Numbered:
  """plan[i] as (i, plan[i]): the worker needs each batch's number for its slot."""

  def __init__(self, plan):
    self.plan = plan

  def __len__(self):
    return len(self.plan)

  def __getitem__(self, i):
    return i, self.plan[i]


def stream(
  split: FileSplit,
  plan: Sequence[dict],
  start: int = 0,
  workers: int | None = None,
  own_images: bool = True,
) -> Iterator[dict]:
  """The batches plan[start:], in order, decoded by `workers` processes (split.workers by
  default; 0 here: decoded in this process, for small jobs where starting processes costs
  more than it saves). Skipped files are counted and logged; a dead worker is a
  DataWorkerError. However the stream ends (exhausted, closed, `break`, collected, an
  exception where it is consumed, the process exiting with it open), its workers stop and
  its ring and semaphores are freed within about a second (_end_stream); a process killed
  with SIGKILL takes its workers with it (_exit_with_parent), and what it leaves in
  /dev/shm the next stream removes (shared_ring.remove_leftovers). docs/reliability-streaming.md.

  own_images=False: a batch's images are a view of the workers' buffer, valid until the
  next batch is asked for (for a caller that copies them at once into its own array: one
  copy fewer of every pixel)."""
  import grain  # Imported here: the memory loader never needs it.

  _allow_grain_flags()
  count = len(plan) - start
  if count <= 0:
    return
  workers = num_workers(split.workers, count) if workers is None else workers
  from multiprocessing import util

  resources = {}  # the ring and Grain's iterator, once made
  end = util.Finalize(None, _end_stream, args=(resources,), exitpriority=10)
  try:
    dataset = grain.MapDataset.source(_Numbered(plan))
    if start:
      dataset = dataset.slice(slice(start, None))
    if workers:
      shared_ring.remove_leftovers()
      shared_ring.name_semaphores_after_this_process()
      shape = (len(plan[start]['rows']), split.size, split.size, 3)
      # Each worker: the batch it decodes and one decoded ahead; more would only wait.
      ring = resources['ring'] = shared_ring.Ring(
        workers * PER_WORKER_BUFFER + 1, shape
      )
      ring.consumed[0] = start
      decode = _DecodeIntoRing(split, ring.name, ring.slots, shape)
    else:
      ring, decode = None, _Gather(split)
    dataset = dataset.map(decode).to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)
    )
    if workers:
      # Labels, masks and indices (up to 2048 rows) go pickled through Grain's queues, not
      # in a shared-memory block each that a group SIGKILL would leave behind unnamed (the
      # images go through the ring). Under 8 KiB an array, the two messages a worker may
      # have in flight fit in its pipe (64 KiB): a worker killed mid-message cannot leave
      # half of one there, which this process would wait for forever.
      dataset = grain.experimental.WithOptionsIterDataset(
        dataset, grain.experimental.DatasetOptions(min_shm_size=8 << 10)
      )
      dataset = dataset.mp_prefetch(
        grain.MultiprocessingOptions(
          num_workers=workers, per_worker_buffer_size=PER_WORKER_BUFFER
        ),
        worker_init_fn=_init_worker,
      )
    resources['iterator'] = iter(dataset)
    del dataset
    yield from _batches(resources, split, ring, own_images, workers)
  finally:
    end()  # _end_stream(resources), once


def _end_stream(resources: dict) -> None:
  """Stops a stream's workers and frees its ring and semaphores: when it ends in any way
  (exhausted, closed, collected, an exception where it is consumed), and at exit for a
  stream left open, before Grain's own finalizers (priority 1) would join each worker for
  up to 25 s and the interpreter's teardown would leave the rest to the resource tracker."""
  ring, iterator = resources.pop('ring', None), resources.pop('iterator', None)
  if ring is not None:
    ring.release()  # first: ends the workers' waits, so that closing Grain's iterator returns
  try:
    if iterator is not None:
      iterator.close()
  finally:
    if ring is not None:
      ring.close()
    # Grain's closed iterator sits in reference cycles that hold its queues' semaphores;
    # collected now, they are unlinked now (else at exit, with a warning each).
    del iterator
    gc.collect()


def _next(iterator):
  try:
    return next(iterator)
  except BaseException as e:
    del iterator
    _drop_frames(e)
    raise


_SUSPENDABLE = (
  inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
)


def _drop_frames(error: BaseException) -> None:
  """Clears the finished frames of `error`'s traceback and their callers (those of a Grain
  thread that raised it and ended), keeping file and line for the message. They hold
  Grain's iterators and, through them, the semaphores of their queues, which are then
  freed when the stream ends (_end_stream) and not only once the caller lets go of the
  error. Frames still running (this thread's callers) and generators are left alone."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    tb = error.__traceback__
    while tb is not None:
      frame = tb.tb_frame
      while frame is not None and not frame.f_code.co_flags & _SUSPENDABLE:
        try:
          frame.clear()
        except RuntimeError:
          break  # running: so are its callers
        frame = frame.f_back
      tb = tb.tb_next
    error = error.__cause__ or error.__context__


def _batches(
  resources: dict, split: FileSplit, ring, own_images: bool, workers: int
) -> Iterator[dict]:
  """stream's loop: Grain's batches, their images taken from the ring. Grain's iterator is
  looked up in `resources` each time, so that no frame here keeps it past the stream's end."""
  skipped = 0
  for received in itertools.count(1):
    died = None
    try:
      batch = _next(resources['iterator'])
    except StopIteration:
      return
    except RuntimeError as e:
      if 'Worker process' not in str(e):
        raise
      died = str(e)
    if (
      died is not None
    ):  # raised out here: Grain's error (and its frames) can go at once
      raise DataWorkerError(
        f'a data loader worker process died while decoding {split.name or "a split"} '
        f'({died}); nothing was trained on a partial batch. If the machine ran out of '
        'memory, lower data.workers or batch_size; rerun to resume from the last '
        'checkpoint'
      )
    # Out of Grain's shared memory at once: what the loop keeps (device prefetch, the
    # last batch) then holds no shared-memory block, and each block is freed as soon as
    # its batch has arrived rather than when the last reference to it goes.
    names = batch.pop('skipped')
    batch = {k: np.array(v) for k, v in batch.items()}
    if len(names):
      skipped += len(names)
      logging.warning(
        'skipped %d unreadable files (data.skip_bad_files=True; %d so far in '
        'this pass of %s), e.g. %s',
        len(names),
        skipped,
        split.name,
        list(names)[:3],
      )
    if ring is None:
      yield batch
      continue
    number = int(batch.pop('number'))
    if own_images:
      batch['image'] = np.array(ring.slot(number))
      ring.consumed[0] = (
        number + 1
      )  # its slot may now take batch number + slots
      yield batch
    else:
      batch['image'] = ring.slot(number)
      yield batch
      ring.consumed[0] = number + 1  # the caller has asked for the next batch


def _allow_grain_flags() -> None:
  """Grain reads absl flags of its own; outside an absl app (the Python API, the tests)
  nothing parsed them, and reading an unparsed flag raises. Their defaults are what we want."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
