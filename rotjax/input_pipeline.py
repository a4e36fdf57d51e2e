"""Host side of the data: which images make each batch, and the two loaders that fetch them.

Knows nothing of rotation or augmentation: those run on device (preprocess.py,
rotation.py). Two loaders (`data.loader`), the same batches from both:

- memory: a split decoded once into uint8 arrays (cached as .npy under data.cache_dir);
  a batch is a fancy-index into them. CIFAR-10 (180 MB) and ImageNette (2.6 GB at 256 px).
- stream: a split kept as file names (streaming.FileSplit); each batch is decoded from
  disk by worker processes while the device trains. ImageNet (190 GB decoded).
- auto (the default): memory where the decoded dataset fits comfortably in the memory
  this machine has available (`choose_loader`), stream otherwise.

Which rows make each batch is decided here, once, for both (TrainPlan, EvalPlan): a pure
function of (seed, epoch, step), so a run resumed mid-epoch sees the batches an
uninterrupted run would have.

Sources: `tfds:NAME` (tfds.load, needs internet the first time) and
`folder:PATH` (PATH/SPLIT/CLASS/IMAGE, image_files.py).
"""
import dataclasses
import hashlib
import logging
import os
from typing import Iterator

import numpy as np
from PIL import Image

from rotjax import image_files
from rotjax import streaming

DATASETS = ('cifar10', 'imagenette', 'imagenet')
LOADERS = ('auto', 'memory', 'stream')
# data.loader=auto keeps a dataset in memory while its decoded images take at most this
# share of the memory available: the rest is the training process, its copies of batches,
# XLA's buffers and everything else on the machine.
MEMORY_SHARE = 0.5


@dataclasses.dataclass
class Split:
  images: np.ndarray   # uint8 [N, H, W, 3]
  labels: np.ndarray   # int32 [N]

  def __len__(self):
    return len(self.labels)

  def take(self, indices) -> 'Split':
    return Split(self.images[indices], self.labels[indices])

  def gather(self, plan: dict) -> dict:
    """One batch of a plan (rows: indices into this split, -1 = padding: zero images)."""
    rows = plan['rows']
    real = rows >= 0
    images, labels = self.images[np.maximum(rows, 0)], self.labels[np.maximum(rows, 0)]
    if not real.all():
      images[~real] = 0
      labels = np.where(real, labels, 0).astype(np.int32)
    return {'image': images, 'label': labels,
            **{k: v for k, v in plan.items() if k != 'rows'}}


@dataclasses.dataclass
class Dataset:
  """The splits this process holds, and how they relate to the whole dataset.

  Training data comes in `num_shards` data shards (shard s: every num_shards-th
  training example). One process holds every shard and all of val and test;
  with several processes, process p holds shard p and every p-th val and test
  example, and `sizes` keeps the whole-dataset counts.
  """
  train: 'Split | streaming.FileSplit'
  val: 'Split | streaming.FileSplit'
  test: 'Split | streaming.FileSplit'
  class_names: tuple[str, ...]
  num_shards: int = 1
  process_index: int = 0
  process_count: int = 1
  sizes: dict | None = None   # whole-dataset {'train', 'val', 'test'} counts (None: these splits)
  loader: str = 'memory'      # 'memory' or 'stream' (what data.loader resolved to)
  loader_reason: str = ''

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def shards(self) -> tuple[int, ...]:
    """The data shards in `train`, interleaved: shard shards[j] at positions j::len(shards)."""
    if self.process_count == 1:
      return tuple(range(self.num_shards))
    return (self.process_index,)

  def size(self, split: str) -> int:
    return self.sizes[split] if self.sizes else len(getattr(self, split))

  def local_batch(self, batch_size: int) -> int:
    """This process's part of a global batch."""
    return batch_size // self.process_count

  def steps_per_epoch(self, batch_size: int) -> int:
    """Global batches per epoch, the last one padded (train_batches): every training image
    once. The largest data shard decides, the same count on every process:
    ceil(ceil(n / shards) / (batch / shards)) = ceil(n / batch)."""
    return -(-self.size('train') // batch_size)

  def eval_steps(self, split: str, batch_size: int) -> int:
    """Evaluation batches covering the largest process's part of `split`."""
    per_process = -(-self.size(split) // self.process_count)
    return -(-per_process // self.local_batch(batch_size))


def storage_size(data_config) -> int:
  """Side of the square in which images are kept in memory.

  CIFAR-style preprocessing crops at full size, so images are kept at
  `image_size`; ImageNet-style keeps the usual 1/0.875 margin for the centre crop.
  """
  if data_config.get('preprocess', 'cifar') == 'imagenet':
    return int(round(data_config.image_size / 0.875))
  return data_config.image_size


# ---------------------------------------------------------------- decoding

# Below this many files a split is decoded in this process: starting worker processes
# (about a second) would cost more than they save.
MIN_FILES_FOR_WORKERS = 2000
# Source images of at least this many pixels are decoded by threads of this process, smaller
# ones by worker processes. PIL lets go of Python's lock while it decodes and resizes, so
# threads scale where that is most of the work (a 224 px JPEG: ~1 ms), and they write
# straight into this process's memory; on tiny images (CIFAR's 32 px: 0.1 ms) the Python
# around each file holds the lock and threads do not scale at all. Measured on 2 cores
# (scripts/benchmark.py --data): CIFAR-10, threads 9008 -> 6047 images/s from 1 to
# 2 cores, processes 7258 -> 10405; ImageNette 224 px, threads 806 -> 1471, processes
# 486 -> 827 (the copy of every decoded pixel out of the workers' buffer into fresh memory
# competes with the workers for the same cores).
THREADS_FROM_PIXELS = 96 * 96


def decode_files(files, labels, size, skip_bad_files=False, workers=0, name=''):
  """(images, labels) of `files`, decoded in parallel (threads or worker processes, one per
  core: THREADS_FROM_PIXELS says which). A bad file is an error naming it, or, with
  skip_bad_files, is dropped with a warning and a count."""
  split = streaming.FileSplit(list(files), np.asarray(labels, np.int32), size, skip_bad_files,
                              workers, name)
  if len(split) < MIN_FILES_FOR_WORKERS or _source_pixels(files[0]) >= THREADS_FROM_PIXELS:
    images, keep = _decode_in_threads(split)
  else:
    images, keep = _decode_in_workers(split)
  if not keep.any():
    raise ValueError(f'no readable images among {len(files)} files, e.g. {list(files)[:3]}')
  labels = np.asarray(labels)
  emptied = sorted(set(labels.tolist()) - set(labels[keep].tolist()))
  if emptied:
    # A class with no images left would still get an output unit and never be seen.
    folder = os.path.dirname(files[labels.tolist().index(emptied[0])])
    raise ValueError(f'every image of class folder {folder} is unreadable')
  if keep.all():   # no copy of the whole split (gigabytes for ImageNette at 256 px)
    return images, labels
  return images[keep], labels[keep]


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
  import concurrent.futures
  images = np.empty((len(split), split.size, split.size, 3), np.uint8)
  keep = np.ones(len(split), bool)

  def read(i):
    image = split.read(i)
    if image is None:
      images[i], keep[i] = 0, False
    else:
      images[i] = image
  with concurrent.futures.ThreadPoolExecutor(split.workers or streaming.available_cores()) as pool:
    list(pool.map(read, range(len(split)), chunksize=64))
  if not keep.all():
    bad = [f for f, ok in zip(split.files, keep) if not ok]
    logging.warning('skipped %d unreadable files (data.skip_bad_files=True), e.g. %s',
                    len(bad), bad[:3])
  return images, keep


def _decode_in_workers(split):
  """(images, keep) decoded by worker processes, as the streaming loader decodes batches."""
  plan = EvalPlan(len(split), 256)
  images = np.empty((len(split), split.size, split.size, 3), np.uint8)
  keep = np.ones(len(split), bool)
  for i, batch in enumerate(streaming.stream(split, plan, own_images=False)):
    # EvalPlan's batch i is rows i * 256 onwards, in order: one copy from the workers'
    # buffer straight into the split's array.
    start = i * plan.batch_size
    count = min(plan.batch_size, len(split) - start)
    images[start:start + count] = batch['image'][:count]
    keep[start:start + count] = batch['mask'][:count] > 0
  return images, keep


def _cache_key(files, size) -> str:
  digest = hashlib.sha1()
  for f in files:
    digest.update(f.encode())
    digest.update(str(os.path.getsize(f)).encode())
  digest.update(str(size).encode())
  return digest.hexdigest()[:16]


def load_folder_split(root, split, size, cache_dir='', skip_bad_files=False, workers=0):
  """A split of an image folder as (images, labels, class_names), via a decoded cache."""
  files, labels, classes = image_files.list_folder_split(root, split)
  images, labels = load_files(files, labels, f'{root}/{split}', size, cache_dir, skip_bad_files,
                              workers)
  return images, labels, classes


def load_files(files, labels, name, size, cache_dir='', skip_bad_files=False, workers=0):
  """Decoded (images, labels) of `files`, cached under cache_dir keyed on the file list."""
  cache = None
  if cache_dir:
    cache_dir = os.path.expanduser(cache_dir)
    split = os.path.basename(name)
    cache = os.path.join(cache_dir, 'decoded', f'{split}-{size}px-{_cache_key(files, size)}')
    if os.path.exists(cache + '.labels.npy'):
      return np.load(cache + '.images.npy'), np.load(cache + '.labels.npy')
  logging.info('decoding %d images of %s at %dpx', len(files), name, size)
  images, labels = decode_files(files, labels, size, skip_bad_files, workers, name)
  if cache:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    # Write-then-rename, labels last: a killed run never leaves a cache that looks whole.
    for suffix, array in (('.images.npy', images), ('.labels.npy', labels)):
      tmp = f'{cache}.{os.getpid()}.tmp.npy'
      np.save(tmp, array)
      os.replace(tmp, cache + suffix)
  return images, labels


def load_tfds_split(name, split, size, data_dir=''):
  """A tfds split as numpy (downloads on first use; needs internet). Images are kept
  encoded by tfds and decoded by PIL here, as a folder's files and the streaming loader's
  records are: one resampling (image_files.fit_square) for every source and loader."""
  import concurrent.futures
  import tensorflow_datasets as tfds   # Imported here: only this source needs TensorFlow.
  try:   # prepared as ArrayRecord (tfds.load cannot read those): its random-access source
    source = streaming.open_tfds_source(name, split, data_dir)
    records, info = [source[i] for i in range(len(source))], source.dataset_info
  except ValueError:   # TFRecord, or not here yet: tfds.load prepares it
    ds, info = tfds.load(name, split=split, with_info=True, data_dir=data_dir or None,
                         decoders={'image': tfds.decode.SkipDecoding()})
    records = list(tfds.as_numpy(ds))
  with concurrent.futures.ThreadPoolExecutor(streaming.available_cores()) as pool:
    images = list(pool.map(lambda r: image_files.decode_bytes(r['image'], size), records))
  labels = np.asarray([r['label'] for r in records], np.int32)
  return np.stack(images), labels, tuple(info.features['label'].names)


def tfds_labels(name, split, data_dir='', cache_dir=''):
  """(labels, class names) of a prepared tfds split, read once from its records through
  tfds.data_source (images left encoded) and cached under cache_dir."""
  source = streaming.open_tfds_source(name, split, data_dir)
  classes = tuple(source.dataset_info.features['label'].names)
  cache = ''
  if cache_dir:
    cache = os.path.join(os.path.expanduser(cache_dir), 'tfds-labels',
                         f'{name.replace("/", "_")}-{split}-{len(source)}.npy')
    if os.path.exists(cache):
      return np.load(cache), classes
  logging.info('reading the labels of tfds:%s %s (%d records, once)', name, split, len(source))
  labels = np.empty(len(source), np.int32)
  for start in range(0, len(source), 1024):
    chunk = range(start, min(start + 1024, len(source)))
    records = source.__getitems__(list(chunk)) if hasattr(source, '__getitems__') else [
        source[i] for i in chunk]
    labels[start:start + len(chunk)] = [r['label'] for r in records]
  if cache:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = f'{cache}.{os.getpid()}.tmp.npy'
    np.save(tmp, labels)
    os.replace(tmp, cache)
  return labels, classes


def tfds_num_examples(name, splits, data_dir='') -> int | None:
  """Examples in `splits` of a tfds dataset where its metadata is on this machine, else None."""
  try:
    import tensorflow_datasets as tfds
    info = tfds.builder(name, data_dir=data_dir or None).info
    return sum(info.splits[split].num_examples for split in splits)
  except Exception:   # not prepared here (tfds.load would download it)
    return None


# ---------------------------------------------------------------- splitting

def parse_source(source: str) -> tuple[str, str]:
  kind, _, arg = source.partition(':')
  if kind not in ('tfds', 'folder') or not arg:
    raise ValueError(f'data.source={source!r} is unknown; allowed: "tfds:NAME" or "folder:PATH"')
  return kind, os.path.expanduser(arg) if kind == 'folder' else arg


def load_split(data_config, split: str):
  kind, arg = parse_source(data_config.source)
  size = storage_size(data_config)
  if kind == 'tfds':
    return load_tfds_split(arg, split, size, data_config.get('data_dir', ''))
  return load_folder_split(arg, split, size, data_config.cache_dir, data_config.skip_bad_files,
                           data_config.get('workers', 0))


def balanced_subset(labels, per_class, order) -> np.ndarray:
  """The first `per_class` indices of each class, in the seeded `order`."""
  chosen = []
  for c in np.unique(labels):
    in_class = order[labels[order] == c]
    if per_class > len(in_class):
      raise ValueError(f'data.samples_per_class={per_class} is larger than class {c} has '
                       f'({len(in_class)} training images after the validation split)')
    chosen.append(in_class[:per_class])
  return np.sort(np.concatenate(chosen))


def select_examples(train_labels, num_test: int, data_config):
  """Sorted indices (train, val, test) into the train and test splits: the seeded val
  split carved from train, the caps, and the balanced labelled subset."""
  rng = np.random.default_rng(data_config.split_seed)
  order = rng.permutation(len(train_labels))
  num_val = int(round(len(order) * data_config.val_fraction))
  val_idx, train_order = order[:num_val], order[num_val:]
  if data_config.max_train_images:
    train_order = train_order[:data_config.max_train_images]
  if data_config.samples_per_class:
    train_idx = balanced_subset(train_labels, data_config.samples_per_class, train_order)
  else:
    train_idx = np.sort(train_order)
  test_idx = np.arange(num_test)
  if data_config.max_eval_images:
    val_idx = val_idx[:data_config.max_eval_images]
    test_idx = rng.permutation(test_idx)[:data_config.max_eval_images]
  return train_idx, np.sort(val_idx), np.sort(test_idx)


def num_data_shards(data_config, process_count: int = 1) -> int:
  """data.num_shards, where 0 means one shard per process."""
  num_shards = data_config.get('num_shards', 0) or process_count
  if process_count > 1 and num_shards != process_count:
    raise ValueError(f'data.num_shards={num_shards} with {process_count} processes: each process '
                     'reads one shard, so leave it 0 (or set it to the process count)')
  return num_shards


def available_memory() -> int:
  """Bytes of memory this machine can give a new allocation now (MemAvailable)."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_AVPHYS_PAGES')


def choose_loader(requested: str, num_images: int, size: int,
                  memory: int | None = None) -> tuple[str, str]:
  """(loader, why): data.loader resolved for `num_images` images kept at size x size.

  'auto' keeps them in memory while their decoded bytes (images x size^2 x 3) are at most
  MEMORY_SHARE of the memory available now, and streams them otherwise.
  """
  if requested not in LOADERS:
    raise ValueError(f'data.loader={requested!r} is unknown; allowed: {LOADERS}')
  decoded = num_images * size * size * 3
  need = f'{num_images} images at {size} px take {decoded / 2**30:.1f} GiB decoded'
  if requested != 'auto':
    return requested, f'data.loader={requested} ({need})'
  memory = available_memory() if memory is None else memory
  have = f'{memory / 2**30:.1f} GiB available'
  if decoded <= MEMORY_SHARE * memory:
    return 'memory', f'auto: {need}, within {MEMORY_SHARE:.0%} of the {have}'
  return 'stream', f'auto: {need}, more than {MEMORY_SHARE:.0%} of the {have}'


def load_dataset(data_config, process_index: int = 0, process_count: int = 1) -> Dataset:
  """Train / val / test splits: all of them with one process, this process's shard of
  each with several, in memory or as files to stream (data.loader). The val split is
  carved from train with `split_seed`, so it is the same on every device, process, loader
  and rerun."""
  if data_config.dataset not in DATASETS:
    raise ValueError(f'data.dataset={data_config.dataset!r} is unknown; allowed: {DATASETS}')
  num_shards = num_data_shards(data_config, process_count)
  kind, root = parse_source(data_config.source)
  requested = data_config.get('loader', 'auto')
  if kind == 'folder':
    # Listing is cheap (no file is opened): the split and the loader are decided from it.
    size = storage_size(data_config)
    train_files, train_labels, classes = image_files.list_folder_split(root, data_config.train_split)
    test_files, test_labels, test_classes = image_files.list_folder_split(root, data_config.test_split)
    _check_same_classes(data_config, classes, test_classes)
    own, sizes = _own_examples(train_labels, len(test_labels), data_config, process_index,
                               process_count)
    # What this process would hold: its part of the (capped, subset) splits, not the folder.
    used = len(np.union1d(own[0], own[1])) + len(own[2])
    loader, why = choose_loader(requested, used, size)
    lists = ((train_files, train_labels), (test_files, test_labels))
    if loader == 'stream':
      dataset = _stream_folder(data_config, root, *lists, classes, own, sizes, process_index,
                               process_count)
    elif process_count > 1 or not data_config.skip_bad_files:
      dataset = _load_folder_part(data_config, root, *lists, classes, own, sizes, process_index,
                                  process_count)
    else:   # skip_bad_files drops files: the split is drawn from what the whole folder keeps
      dataset = None
    if dataset is not None:
      logging.info('data loader: %s (%s)', loader, why)
      return dataclasses.replace(dataset, loader=loader, loader_reason=why)
  else:
    data_dir = data_config.get('data_dir', '')
    count = tfds_num_examples(root, (data_config.train_split, data_config.test_split), data_dir)
    if count is None and requested != 'stream':
      loader, why = 'memory', f'tfds:{root} is not prepared here: tfds.load fetches it'
    else:
      loader, why = choose_loader(requested, (count or 0) // process_count,
                                  storage_size(data_config))
    if loader == 'stream':
      logging.info('data loader: stream (%s)', why)
      dataset = _stream_tfds(data_config, root, process_index, process_count)
      return dataclasses.replace(dataset, loader=loader, loader_reason=why)
  # One process in memory, or tfds (which has no cheap way to read labels alone): load
  # every example, then keep this process's part.
  train_images, train_labels, classes = load_split(data_config, data_config.train_split)
  test_images, test_labels, test_classes = load_split(data_config, data_config.test_split)
  _check_same_classes(data_config, classes, test_classes)
  (own_train, own_val, own_test), sizes = _own_examples(train_labels, len(test_labels), data_config,
                                                        process_index, process_count)
  train, test = Split(train_images, train_labels), Split(test_images, test_labels)
  logging.info('data loader: memory (%s)', why)
  return Dataset(train.take(own_train), train.take(own_val), test.take(own_test), classes,
                 num_shards, process_index, process_count, sizes, 'memory', why)


def _stream_folder(data_config, root, train_list, test_list, classes, own, sizes, process_index,
                   process_count) -> Dataset:
  """This process's part of an image folder as FileSplits: nothing is decoded before a
  batch needs it. Files that turn out unreadable are masked where they fall
  (data.skip_bad_files), so every process keeps the same file lists and split."""
  (train_files, train_labels), (test_files, test_labels) = train_list, test_list
  own_train, own_val, own_test = own
  size, workers = storage_size(data_config), data_config.get('workers', 0)
  train = streaming.FileSplit(train_files, train_labels, size, data_config.skip_bad_files, workers,
                              f'{root}/{data_config.train_split}')
  test = streaming.FileSplit(test_files, test_labels, size, data_config.skip_bad_files, workers,
                             f'{root}/{data_config.test_split}')
  return Dataset(train.take(own_train), train.take(own_val), test.take(own_test), classes,
                 num_data_shards(data_config, process_count), process_index, process_count, sizes)


def _stream_tfds(data_config, name, process_index, process_count) -> Dataset:
  """This process's part of a prepared tfds dataset, its records read on demand through
  tfds.data_source by the decoding workers (streaming.TfdsReader)."""
  data_dir, cache_dir = data_config.get('data_dir', ''), data_config.cache_dir
  train_labels, classes = tfds_labels(name, data_config.train_split, data_dir, cache_dir)
  test_labels, test_classes = tfds_labels(name, data_config.test_split, data_dir, cache_dir)
  _check_same_classes(data_config, classes, test_classes)
  (own_train, own_val, own_test), sizes = _own_examples(train_labels, len(test_labels), data_config,
                                                        process_index, process_count)
  size, workers = storage_size(data_config), data_config.get('workers', 0)

  def split(which, labels):
    return streaming.FileSplit(list(range(len(labels))), labels, size, data_config.skip_bad_files,
                               workers, f'tfds:{name} {which}',
                               streaming.TfdsReader(name, which, data_dir))
  train = split(data_config.train_split, train_labels)
  test = split(data_config.test_split, test_labels)
  return Dataset(train.take(own_train), train.take(own_val), test.take(own_test), classes,
                 num_data_shards(data_config, process_count), process_index, process_count, sizes)


def _load_folder_part(data_config, root, train_list, test_list, classes, own, sizes,
                      process_index, process_count) -> Dataset:
  """This process's part of an image folder in memory: the file lists decide the split for
  every process alike, and only the images this process holds are decoded (a capped or
  labels-per-class run on a large folder decodes its few images, not the folder; the whole
  split, where it is all used, has the cache entry it always had)."""
  if data_config.skip_bad_files:
    raise ValueError('data.skip_bad_files=True with data.loader=memory needs one process: with '
                     'several, every process must see the same file list; use '
                     'data.loader=stream (it masks unreadable files where they fall) or remove '
                     'the unreadable files')
  size = storage_size(data_config)
  (train_files, train_labels), (test_files, test_labels) = train_list, test_list
  own_train, own_val, own_test = own
  parts = {}
  for split, files, labels, wanted in (
      (data_config.train_split, train_files, train_labels, (own_train, own_val)),
      (data_config.test_split, test_files, test_labels, (own_test,))):
    rows = np.unique(np.concatenate(wanted))
    images, kept_labels = load_files([files[i] for i in rows], labels[rows],
                                     f'{root}/{split}', size, data_config.cache_dir,
                                     workers=data_config.get('workers', 0))
    local = Split(images, kept_labels)
    parts[split] = [local.take(np.searchsorted(rows, idx)) for idx in wanted]
  (train, val), (test,) = parts[data_config.train_split], parts[data_config.test_split]
  return Dataset(train, val, test, classes, num_data_shards(data_config, process_count),
                 process_index, process_count, sizes)


def _own_examples(train_labels, num_test: int, data_config, process_index: int,
                  process_count: int):
  """((train, val, test) indices this process holds, {split: size of the whole split}).

  The split is decided from the labels alone, the same in every process; process p then
  holds every process_count-th example of each split from p on."""
  train_idx, val_idx, test_idx = select_examples(train_labels, num_test, data_config)
  own = tuple(i[process_index::process_count] for i in (train_idx, val_idx, test_idx))
  return own, {'train': len(train_idx), 'val': len(val_idx), 'test': len(test_idx)}


def _check_same_classes(data_config, classes, test_classes):
  if classes != test_classes:
    raise ValueError(f'class names differ between splits {data_config.train_split!r} {classes} '
                     f'and {data_config.test_split!r} {test_classes}')


# ---------------------------------------------------------------- batching

# Mixes the rows of each batch (with seed, epoch, step); the 4th key entry keeps it apart
# from the shards' orders, keyed on (seed, epoch[, shard]).
_MIX_KEY = 0x6d6978


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
  those rows: the loss gives them weight 0 (train.train_step). Repeats of real
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
  process's part starts): augmentation is keyed on it (train.make_prepare_fn), so one
  device and several still draw the same numbers for each image.

  A Sequence, step i computed when asked for: the streaming loader's workers each build
  the steps they decode, and a resumed run starts at its step.
  """

  def __init__(self, num_rows: int, batch_size: int, seed: int, epoch: int, shards=(0,),
               num_steps: int | None = None, first_index: int = 0):
    self.seed, self.epoch, self.first_index = seed, epoch, first_index
    self.per_shard = batch_size // len(shards)
    self.orders = []
    for j, shard_id in enumerate(shards):
      positions = np.arange(j, num_rows, len(shards))
      # Shard 0 keeps the key (seed, epoch) alone: the order one process has always used,
      # so runs checkpointed before data shards existed resume with the very batches an
      # uninterrupted run of theirs would have seen (fault_drill.py checks resumes bit for bit).
      key = [seed, epoch] if shard_id == 0 else [seed, epoch, shard_id]
      self.orders.append(positions[np.random.default_rng(key).permutation(len(positions))])
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
    mixed = np.random.default_rng([self.seed, self.epoch, i, _MIX_KEY]).permutation(per_shard)
    index = np.concatenate([j * per_shard + mixed for j in range(len(parts))])
    return {'rows': np.concatenate([idx[mixed] for idx, _ in parts]),
            'mask': np.concatenate([mask[mixed] for _, mask in parts]),
            'index': (self.first_index + index).astype(np.int32)}


class EpochsPlan:
  """The training batches of several epochs one after another (a TrainPlan each): one
  stream over them keeps its decoding workers from epoch to epoch, and they decode the
  next epoch's first batches while this one is being evaluated."""

  def __init__(self, num_rows: int, batch_size: int, seed: int, epochs: range, shards,
               steps_per_epoch: int, first_index: int = 0):
    self.args = (num_rows, batch_size, seed)
    self.epochs, self.shards, self.first_index = epochs, tuple(shards), first_index
    self.steps_per_epoch = steps_per_epoch
    self._last = None   # (epoch, TrainPlan): consecutive steps share their epoch's orders

  def __len__(self):
    return len(self.epochs) * self.steps_per_epoch

  def __getitem__(self, k: int) -> dict:
    epoch = self.epochs[k // self.steps_per_epoch]
    if self._last is None or self._last[0] != epoch:
      num_rows, batch_size, seed = self.args
      self._last = (epoch, TrainPlan(num_rows, batch_size, seed, epoch, self.shards,
                                     self.steps_per_epoch, self.first_index))
    return self._last[1][k % self.steps_per_epoch]


class EvalPlan:
  """Every row of a split once, in order, in batches of `batch_size`, then fully padded
  batches up to `num_batches` (so that every process runs as many steps); rows -1 and
  mask 0 on the padding."""

  def __init__(self, num_rows: int, batch_size: int, num_batches: int | None = None):
    self.num_rows, self.batch_size = num_rows, batch_size
    self.num_batches = -(-num_rows // batch_size) if num_batches is None else num_batches

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


def train_batches(split, batch_size: int, seed: int, epoch: int, shards=(0,),
                  num_steps: int | None = None, first_index: int = 0,
                  start: int = 0) -> Iterator[dict]:
  """One epoch of training batches (TrainPlan), from step `start` on."""
  plan = TrainPlan(len(split), batch_size, seed, epoch, shards, num_steps, first_index)
  return batches(split, plan, start)


def _padded_slice(order: np.ndarray, start: int, size: int) -> tuple[np.ndarray, np.ndarray]:
  """order[start:start + size] (sorted: a faster gather of the same set), filled up past the
  end of `order` with its first entries again; (indices, mask), mask 0 on the fill."""
  positions = np.arange(start, start + size)
  idx = order[positions % len(order)]
  mask = (positions < len(order)).astype(np.float32)
  by_index = np.argsort(idx, kind='stable')
  return idx[by_index], mask[by_index]


def epochs_of_batches(split, batch_size: int, seed: int, epochs: range, shards,
                      steps_per_epoch: int, first_index: int = 0, first_step: int = 0):
  """The training batches of `epochs`, from step `first_step` of the first, as one stream
  (EpochsPlan): the loop takes steps_per_epoch of them per epoch. Close it when done."""
  plan = EpochsPlan(len(split), batch_size, seed, epochs, shards, steps_per_epoch, first_index)
  return batches(split, plan, first_step)


def eval_batches(split, batch_size: int, num_batches: int | None = None) -> Iterator[dict]:
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


def shard(batch: dict, num_devices: int) -> dict:
  """[global, ...] -> [devices, per_device, ...], for pmap."""
  def reshape(x):
    if x.shape[0] % num_devices:
      raise ValueError(f'batch of {x.shape[0]} does not split over {num_devices} devices')
    return x.reshape(num_devices, x.shape[0] // num_devices, *x.shape[1:])
  return {k: reshape(v) for k, v in batch.items()}
