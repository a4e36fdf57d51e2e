"""The dataset: its train / val / test splits, this process's part of them, and which loader.

Knows nothing of rotation or augmentation: those run on device (preprocess.py,
rotation.py). Two loaders (`data.loader`), the same batches from both:

- memory: a split decoded once into uint8 arrays (memory_loader.py, cached under
  data.cache_dir). CIFAR-10 (180 MB) and ImageNette (2.6 GB at 256 px).
- stream: a split kept as file names (streaming.FileSplit); each batch is decoded from
  disk by worker processes while the device trains. ImageNet (190 GB decoded).
- auto (the default): memory where the decoded dataset fits comfortably in the memory
  this machine has available (`choose_loader`), stream otherwise.

The val split is carved from train here (`select_examples`), from the labels alone, so it
is the same for every process, loader and rerun; which rows make each batch is decided in
batch_plans.py.

Sources: `tfds:NAME` (tfds_source.py, needs internet the first time) and
`folder:PATH` (PATH/SPLIT/CLASS/IMAGE, image_files.py).
"""

import dataclasses
import logging
import os

import numpy as np

from rotjax import example_selection
from rotjax import image_files
from rotjax import memory_loader
from rotjax import streaming
from rotjax import tfds_source

DATASETS = ('cifar10', 'imagenette', 'imagenet')
LOADERS = ('auto', 'memory', 'stream')
# data.loader=auto keeps a dataset in memory while its decoded images take at most this
# share of the memory available: the rest is the training process, its copies of batches,
# XLA's buffers and everything else on the machine.
MEMORY_SHARE = 0.5


@dataclasses.dataclass
class Dataset:
  """The splits this process holds, and how they relate to the whole dataset.

  Training data comes in `num_shards` data shards (shard s: every num_shards-th
  training example). One process holds every shard and all of val and test;
  with several processes, process p holds shard p and every p-th val and test
  example, and `sizes` keeps the whole-dataset counts.
  """

  train: 'memory_loader.Split | streaming.FileSplit'
  val: 'memory_loader.Split | streaming.FileSplit'
  test: 'memory_loader.Split | streaming.FileSplit'
  class_names: tuple[str, ...]
  num_shards: int = 1
  process_index: int = 0
  process_count: int = 1
  sizes: dict | None = (
    None  # whole-dataset {'train', 'val', 'test'} counts (None: these splits)
  )
  loader: str = 'memory'  # 'memory' or 'stream' (what data.loader resolved to)
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


def parse_source(source: str) -> tuple[str, str]:
  kind, _, arg = source.partition(':')
  if kind not in ('tfds', 'folder') or not arg:
    raise ValueError(
      f'data.source={source!r} is unknown; allowed: "tfds:NAME" or "folder:PATH"'
    )
  return kind, os.path.expanduser(arg) if kind == 'folder' else arg


def num_data_shards(data_config, process_count: int = 1) -> int:
  """data.num_shards, where 0 means one shard per process."""
  num_shards = data_config.get('num_shards', 0) or process_count
  if process_count > 1 and num_shards != process_count:
    raise ValueError(
      f'data.num_shards={num_shards} with {process_count} processes: each process '
      'reads one shard, so leave it 0 (or set it to the process count)'
    )
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


def choose_loader(
  requested: str, num_images: int, size: int, memory: int | None = None
) -> tuple[str, str]:
  """(loader, why): data.loader resolved for `num_images` images kept at size x size.

  'auto' keeps them in memory while their decoded bytes (images x size^2 x 3) are at most
  MEMORY_SHARE of the memory available now, and streams them otherwise.
  """
  if requested not in LOADERS:
    raise ValueError(
      f'data.loader={requested!r} is unknown; allowed: {LOADERS}'
    )
  decoded = num_images * size * size * 3
  need = (
    f'{num_images} images at {size} px take {decoded / 2**30:.1f} GiB decoded'
  )
  if requested != 'auto':
    return requested, f'data.loader={requested} ({need})'
  memory = available_memory() if memory is None else memory
  have = f'{memory / 2**30:.1f} GiB available'
  if decoded <= MEMORY_SHARE * memory:
    return 'memory', f'auto: {need}, within {MEMORY_SHARE:.0%} of the {have}'
  return 'stream', f'auto: {need}, more than {MEMORY_SHARE:.0%} of the {have}'


def load_dataset(
  data_config, process_index: int = 0, process_count: int = 1
) -> Dataset:
  """Train / val / test splits: all of them with one process, this process's shard of
  each with several, in memory or as files to stream (data.loader). The val split is
  carved from train with `split_seed`, so it is the same on every device, process, loader
  and rerun."""
  if data_config.dataset not in DATASETS:
    raise ValueError(
      f'data.dataset={data_config.dataset!r} is unknown; allowed: {DATASETS}'
    )
  num_shards = num_data_shards(data_config, process_count)
  kind, root = parse_source(data_config.source)
  requested = data_config.get('loader', 'auto')
  if kind == 'folder':
    # Listing is cheap (no file is opened): the split and the loader are decided from it.
    size = storage_size(data_config)
    train_files, train_labels, classes = image_files.list_folder_split(
      root, data_config.train_split
    )
    test_files, test_labels, test_classes = image_files.list_folder_split(
      root, data_config.test_split
    )
    _check_same_classes(data_config, classes, test_classes)
    own, sizes = example_selection.own_examples(
      train_labels, len(test_labels), data_config, process_index, process_count
    )
    # What this process would hold: its part of the (capped, subset) splits, not the folder.
    used = len(np.union1d(own[0], own[1])) + len(own[2])
    loader, why = choose_loader(requested, used, size)
    lists = ((train_files, train_labels), (test_files, test_labels))
    if loader == 'stream':
      dataset = _stream_folder(
        data_config,
        root,
        *lists,
        classes,
        own,
        sizes,
        process_index,
        process_count,
      )
    else:
      dataset = _load_folder_part(
        data_config,
        root,
        *lists,
        classes,
        own,
        sizes,
        process_index,
        process_count,
      )
    logging.info('data loader: %s (%s)', loader, why)
    return dataclasses.replace(dataset, loader=loader, loader_reason=why)
  else:
    data_dir = data_config.get('data_dir', '')
    count = tfds_source.num_examples(
      root, (data_config.train_split, data_config.test_split), data_dir
    )
    if count is None and requested != 'stream':
      loader, why = (
        'memory',
        f'tfds:{root} is not prepared here: tfds.load fetches it',
      )
    else:
      loader, why = choose_loader(
        requested, (count or 0) // process_count, storage_size(data_config)
      )
    if loader == 'stream':
      logging.info('data loader: stream (%s)', why)
      dataset = _stream_tfds(data_config, root, process_index, process_count)
      return dataclasses.replace(dataset, loader=loader, loader_reason=why)
  # tfds in memory (it has no cheap way to read labels alone): load every example, then
  # keep this process's part.
  size, data_dir = storage_size(data_config), data_config.get('data_dir', '')
  train_images, train_labels, classes = tfds_source.load_split(
    root, data_config.train_split, size, data_dir
  )
  test_images, test_labels, test_classes = tfds_source.load_split(
    root, data_config.test_split, size, data_dir
  )
  _check_same_classes(data_config, classes, test_classes)
  (own_train, own_val, own_test), sizes = example_selection.own_examples(
    train_labels, len(test_labels), data_config, process_index, process_count
  )
  train = memory_loader.Split(train_images, train_labels)
  test = memory_loader.Split(test_images, test_labels)
  logging.info('data loader: memory (%s)', why)
  return Dataset(
    train.take(own_train),
    train.take(own_val),
    test.take(own_test),
    classes,
    num_shards,
    process_index,
    process_count,
    sizes,
    'memory',
    why,
  )


def _stream_folder(
  data_config,
  root,
  train_list,
  test_list,
  classes,
  own,
  sizes,
  process_index,
  process_count,
) -> Dataset:
  """This process's part of an image folder as FileSplits: nothing is decoded before a
  batch needs it. Files that turn out unreadable are masked where they fall
  (data.skip_bad_files), so every process keeps the same file lists and split."""
  (train_files, train_labels), (test_files, test_labels) = train_list, test_list
  own_train, own_val, own_test = own
  size, workers = storage_size(data_config), data_config.get('workers', 0)
  train = streaming.FileSplit(
    train_files,
    train_labels,
    size,
    data_config.skip_bad_files,
    workers,
    f'{root}/{data_config.train_split}',
  )
  test = streaming.FileSplit(
    test_files,
    test_labels,
    size,
    data_config.skip_bad_files,
    workers,
    f'{root}/{data_config.test_split}',
  )
  return Dataset(
    train.take(own_train),
    train.take(own_val),
    test.take(own_test),
    classes,
    num_data_shards(data_config, process_count),
    process_index,
    process_count,
    sizes,
  )


def _stream_tfds(data_config, name, process_index, process_count) -> Dataset:
  """This process's part of a prepared tfds dataset, its records read on demand through
  tfds.data_source by the decoding workers (tfds_source.TfdsReader)."""
  data_dir, cache_dir = data_config.get('data_dir', ''), data_config.cache_dir
  train_labels, classes = tfds_source.read_labels(
    name, data_config.train_split, data_dir, cache_dir
  )
  test_labels, test_classes = tfds_source.read_labels(
    name, data_config.test_split, data_dir, cache_dir
  )
  _check_same_classes(data_config, classes, test_classes)
  (own_train, own_val, own_test), sizes = example_selection.own_examples(
    train_labels, len(test_labels), data_config, process_index, process_count
  )
  size, workers = storage_size(data_config), data_config.get('workers', 0)

  def split(which, labels):
    return streaming.FileSplit(
      list(range(len(labels))),
      labels,
      size,
      data_config.skip_bad_files,
      workers,
      f'tfds:{name} {which}',
      tfds_source.TfdsReader(name, which, data_dir),
    )

  train = split(data_config.train_split, train_labels)
  test = split(data_config.test_split, test_labels)
  return Dataset(
    train.take(own_train),
    train.take(own_val),
    test.take(own_test),
    classes,
    num_data_shards(data_config, process_count),
    process_index,
    process_count,
    sizes,
  )


def _load_folder_part(
  data_config,
  root,
  train_list,
  test_list,
  classes,
  own,
  sizes,
  process_index,
  process_count,
) -> Dataset:
  """This process's part of an image folder in memory: the file lists decide the split for
  every process alike, and only the images this process holds are decoded (a capped or
  labels-per-class run on a large folder decodes its few images, not the folder; the whole
  split, where it is all used, has the cache entry it always had)."""
  size = storage_size(data_config)
  (train_files, train_labels), (test_files, test_labels) = train_list, test_list
  own_train, own_val, own_test = own
  parts = {}
  for split, files, labels, wanted in (
    (data_config.train_split, train_files, train_labels, (own_train, own_val)),
    (data_config.test_split, test_files, test_labels, (own_test,)),
  ):
    rows = np.unique(np.concatenate(wanted))
    local = memory_loader.load_files(
      [files[i] for i in rows],
      labels[rows],
      f'{root}/{split}',
      size,
      data_config.cache_dir,
      data_config.skip_bad_files,
      data_config.get('workers', 0),
    )
    parts[split] = [local.take(np.searchsorted(rows, idx)) for idx in wanted]
  (train, val), (test,) = (
    parts[data_config.train_split],
    parts[data_config.test_split],
  )
  return Dataset(
    train,
    val,
    test,
    classes,
    num_data_shards(data_config, process_count),
    process_index,
    process_count,
    sizes,
  )


def _check_same_classes(data_config, classes, test_classes):
  if classes != test_classes:
    raise ValueError(
      f'class names differ between splits {data_config.train_split!r} {classes} '
      f'and {data_config.test_split!r} {test_classes}'
    )
