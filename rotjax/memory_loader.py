"""The memory loader: a split decoded once into uint8 arrays, a batch a fancy-index into them.

For datasets that fit in memory: CIFAR-10 (180 MB) and ImageNette (2.6 GB at 256 px).
A split's files are decoded once, in parallel, and cached as .npy under data.cache_dir,
keyed on the file list, so a second run (or stage) reads them back instead of decoding.
Each image goes through image_files.decode_image, as the streaming loader's do.
"""

import concurrent.futures
import dataclasses
import hashlib
import logging
import os

import numpy as np
from PIL import Image

from rotjax import batch_plans
from rotjax import image_files
from rotjax import streaming


@dataclasses.dataclass
class Split:
  """A split in memory: its images decoded, row for row with their labels.

  An unreadable file skipped with data.skip_bad_files keeps its row (readable False):
  the split, and so the seeded val split drawn from it, is the one the file list gives,
  as the streaming loader's is, and its batches mask it the same way."""

  images: np.ndarray  # uint8 [N, H, W, 3]
  labels: np.ndarray  # int32 [N]
  readable: np.ndarray | None = None  # bool [N]; None: every row

  def __len__(self):
    return len(self.labels)

  def take(self, indices) -> 'Split':
    readable = None if self.readable is None else self.readable[indices]
    if readable is not None and readable.all():
      readable = None
    return Split(self.images[indices], self.labels[indices], readable)

  def gather(self, plan: dict) -> dict:
    """One batch of a plan (rows: indices into this split, -1 = padding: zero images);
    an unreadable row gets mask 0 and another image of the batch (streaming.FileSplit)."""
    rows = plan['rows']
    real = rows >= 0
    images, labels = (
      self.images[np.maximum(rows, 0)],
      self.labels[np.maximum(rows, 0)],
    )
    if not real.all():
      images[~real] = 0
      labels = np.where(real, labels, 0).astype(np.int32)
    batch = {
      'image': images,
      'label': labels,
      **{k: v for k, v in plan.items() if k != 'rows'},
    }
    if self.readable is not None:
      bad = np.flatnonzero(real & ~self.readable[np.maximum(rows, 0)])
      if len(bad):
        batch['mask'] = streaming.mask_unreadable(
          images, batch['mask'], rows, bad
        )
    return batch


# Below this many files a split is decoded in this process: starting worker processes
# (about a second) would cost more than they save.
MIN_FILES_FOR_WORKERS = 2000
# Source images of at least this many pixels are decoded by threads of this process, smaller
# ones by worker processes. PIL lets go of Python's lock while it decodes and resizes, so
# threads scale where that is most of the work (a 224 px JPEG: ~1 ms), and they write
# straight into this process's memory; on tiny images (CIFAR's 32 px: 0.1 ms) the Python
# around each file holds the lock and threads do not scale at all. Measured on 2 cores
# (docs/performance.md, scripts/benchmark.py --data): CIFAR-10, threads 9008 -> 6047 images/s from 1 to
# 2 cores, processes 7258 -> 10405; ImageNette 224 px, threads 806 -> 1471, processes
# 486 -> 827 (the copy of every decoded pixel out of the workers' buffer into fresh memory
# competes with the workers for the same cores).
THREADS_FROM_PIXELS = 96 * 96


def decode_files(
  files, labels, size, skip_bad_files=False, workers=0, name=''
) -> Split:
  """`files` decoded in parallel (threads or worker processes, one per core:
  THREADS_FROM_PIXELS says which), row for row. A bad file is an error naming it, or,
  with skip_bad_files, keeps its row marked unreadable (Split.readable), with a warning
  and a count."""
  split = streaming.FileSplit(
    list(files),
    np.asarray(labels, np.int32),
    size,
    skip_bad_files,
    workers,
    name,
  )
  if (
    len(split) < MIN_FILES_FOR_WORKERS
    or _source_pixels(files[0]) >= THREADS_FROM_PIXELS
  ):
    images, keep = _decode_in_threads(split)
  else:
    images, keep = _decode_in_workers(split)
  if not keep.any():
    raise ValueError(
      f'no readable images among {len(files)} files, e.g. {list(files)[:3]}'
    )
  labels = np.asarray(labels, np.int32)
  emptied = sorted(set(labels.tolist()) - set(labels[keep].tolist()))
  if emptied:
    # A class with no images left would still get an output unit and never be seen.
    folder = os.path.dirname(files[labels.tolist().index(emptied[0])])
    raise ValueError(f'every image of class folder {folder} is unreadable')
  return Split(images, labels, None if keep.all() else keep)


def _source_pixels(path: str) -> int:
  """Pixels of an image file, from its header (0 where it is unreadable)."""
  try:
    with Image.open(path) as image:
      return image.size[0] * image.size[1]
  except Exception:
    return 0


def _decode_in_threads(split):
  """(images, keep) decoded by one thread per core, each writing its images straight into
  the split's array: its fresh pages (gigabytes) are then faulted in by all threads at once
  (one thread stacking them afterwards took 2-3 s of ImageNette's 9 s on 2 cores)."""
  images = np.empty((len(split), split.size, split.size, 3), np.uint8)
  keep = np.ones(len(split), bool)

  def read(i):
    image = split.read(i)
    if image is None:
      images[i], keep[i] = 0, False
    else:
      images[i] = image

  with concurrent.futures.ThreadPoolExecutor(
    split.workers or streaming.available_cores()
  ) as pool:
    list(pool.map(read, range(len(split)), chunksize=64))
  if not keep.all():
    bad = [f for f, ok in zip(split.files, keep) if not ok]
    logging.warning(
      'skipped %d unreadable files (data.skip_bad_files=True), e.g. %s',
      len(bad),
      bad[:3],
    )
  return images, keep


def _decode_in_workers(split):
  """(images, keep) decoded by worker processes, as the streaming loader decodes batches."""
  plan = batch_plans.EvalPlan(len(split), 256)
  images = np.empty((len(split), split.size, split.size, 3), np.uint8)
  keep = np.ones(len(split), bool)
  for i, batch in enumerate(streaming.stream(split, plan, own_images=False)):
    # EvalPlan's batch i is rows i * 256 onwards, in order: one copy from the workers'
    # buffer straight into the split's array.
    start = i * plan.batch_size
    count = min(plan.batch_size, len(split) - start)
    images[start : start + count] = batch['image'][:count]
    keep[start : start + count] = batch['mask'][:count] > 0
  return images, keep


def _cache_key(files, size) -> str:
  digest = hashlib.sha1()
  for f in files:
    digest.update(f.encode())
    digest.update(str(os.path.getsize(f)).encode())
  digest.update(str(size).encode())
  return digest.hexdigest()[:16]


def load_folder_split(
  root, split, size, cache_dir='', skip_bad_files=False, workers=0
) -> tuple[Split, tuple]:
  """A split of an image folder as (Split, class_names), via a decoded cache."""
  files, labels, classes = image_files.list_folder_split(root, split)
  decoded = load_files(
    files, labels, f'{root}/{split}', size, cache_dir, skip_bad_files, workers
  )
  return decoded, classes


def load_files(
  files, labels, name, size, cache_dir='', skip_bad_files=False, workers=0
) -> Split:
  """`files` decoded (decode_files), cached under cache_dir keyed on the file list."""
  cache = None
  if cache_dir:
    cache_dir = os.path.expanduser(cache_dir)
    split = os.path.basename(name)
    cache = os.path.join(
      cache_dir, 'decoded', f'{split}-{size}px-{_cache_key(files, size)}'
    )
    cached = _read_cache(cache, len(files), skip_bad_files)
    if cached is not None:
      return cached
  logging.info('decoding %d images of %s at %dpx', len(files), name, size)
  decoded = decode_files(files, labels, size, skip_bad_files, workers, name)
  if cache:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    for stale in (
      '.labels.npy',
      '.readable.npy',
    ):  # labels first: no longer whole
      if os.path.exists(cache + stale):
        os.remove(cache + stale)
    arrays = [('.images.npy', decoded.images)]
    if decoded.readable is not None:
      arrays.append(('.readable.npy', decoded.readable))
    # Write-then-rename, labels last: a killed run never leaves a cache that looks whole.
    for suffix, array in arrays + [('.labels.npy', decoded.labels)]:
      tmp = f'{cache}.{os.getpid()}.tmp.npy'
      np.save(tmp, array)
      os.replace(tmp, cache + suffix)
  return decoded


def _read_cache(cache: str, num_files: int, skip_bad_files: bool):
  """The Split cached at `cache`, or None where it must be decoded (again): no entry; one
  written by a rotjax that dropped unreadable rows (fewer rows than files); one with
  unreadable rows when skip_bad_files is off (decoding names the file)."""
  if not os.path.exists(cache + '.labels.npy'):
    return None
  labels = np.load(cache + '.labels.npy')
  readable = None
  if os.path.exists(cache + '.readable.npy'):
    readable = np.load(cache + '.readable.npy')
  if len(labels) != num_files or (readable is not None and not skip_bad_files):
    return None
  return Split(np.load(cache + '.images.npy'), labels, readable)
