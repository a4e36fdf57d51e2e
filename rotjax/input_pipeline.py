"""Host side of the data: load a dataset into memory as uint8, split it, batch it.

Knows nothing of rotation or augmentation: those run on device (preprocess.py,
rotation.py). A dataset is small enough for host memory (CIFAR-10: 180 MB;
ImageNette stored at 64-256 px), so each split is a pair of numpy arrays and a
batch is a fancy-index into them: the input pipeline costs next to nothing.

Sources: `tfds:NAME` (tfds.load, needs internet the first time) and
`folder:PATH` (PATH/SPLIT/CLASS/IMAGE, decoded in parallel with PIL and cached
as .npy files under `data.cache_dir`).
"""
import concurrent.futures
import dataclasses
import hashlib
import logging
import os
from typing import Iterator

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
DATASETS = ('cifar10', 'imagenette')


@dataclasses.dataclass
class Split:
  images: np.ndarray   # uint8 [N, H, W, 3]
  labels: np.ndarray   # int32 [N]

  def __len__(self):
    return len(self.labels)

  def take(self, indices) -> 'Split':
    return Split(self.images[indices], self.labels[indices])


@dataclasses.dataclass
class Dataset:
  """The splits this process holds, and how they relate to the whole dataset.

  Training data comes in `num_shards` data shards (shard s: every num_shards-th
  training example). One process holds every shard and all of val and test;
  with several processes, process p holds shard p and every p-th val and test
  example, and `sizes` keeps the whole-dataset counts.
  """
  train: Split
  val: Split
  test: Split
  class_names: tuple[str, ...]
  num_shards: int = 1
  process_index: int = 0
  process_count: int = 1
  sizes: dict | None = None   # whole-dataset {'train', 'val', 'test'} counts (None: these splits)

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

def decode_image(path: str, size: int) -> np.ndarray:
  """One file -> uint8 [size, size, 3]: RGB-converted, shorter side resized, centre-cropped."""
  with Image.open(path) as image:
    return fit_square(image.convert('RGB'), size)   # grayscale, palette, RGBA -> RGB


def fit_square(image: Image.Image, size: int) -> np.ndarray:
  """RGB PIL image -> uint8 [size, size, 3]: shorter side resized (bicubic), centre-cropped."""
  width, height = image.size
  if (width, height) != (size, size):
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    image = image.crop((left, top, left + size, top + size))
  return np.asarray(image, dtype=np.uint8)


# tfds calls ImageNette's held-out split 'validation'; image-folder copies call it 'val'.
SPLIT_ALIASES = {'validation': 'val', 'val': 'validation'}


def list_folder_split(root: str, split: str) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
  """Files, integer labels and sorted class names of ROOT/SPLIT/CLASS/IMAGE."""
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir) and split in SPLIT_ALIASES:
    split_dir = os.path.join(root, SPLIT_ALIASES[split])
  if not os.path.isdir(split_dir):
    raise FileNotFoundError(f'data.source folder has no split {split!r}: {split_dir} does not exist')
  classes = tuple(sorted(d for d in os.listdir(split_dir)
                         if os.path.isdir(os.path.join(split_dir, d))))
  if not classes:
    raise ValueError(f'split folder {split_dir} has no class sub-folders')
  files, labels = [], []
  for label, name in enumerate(classes):
    class_dir = os.path.join(split_dir, name)
    names = sorted(f for f in os.listdir(class_dir) if not f.startswith('.'))
    if not names:
      raise ValueError(f'class folder {class_dir} is empty')
    files += [os.path.join(class_dir, f) for f in names]
    labels += [label] * len(names)
  return files, np.asarray(labels, np.int32), classes


def decode_files(files, labels, size, skip_bad_files=False, threads=None):
  """Decodes files in parallel (PIL releases the GIL). A bad file is an error naming it,
  or, with skip_bad_files, is dropped with a warning and a count."""
  def load(path):
    try:
      return decode_image(path, size)
    except Exception as e:  # PIL raises several types for corrupt/non-image files.
      if not skip_bad_files:
        raise ValueError(f'cannot read image {path}: {e} '
                         '(set data.skip_bad_files=True to skip such files)') from e
      return None
  with concurrent.futures.ThreadPoolExecutor(threads or os.cpu_count()) as pool:
    decoded = list(pool.map(load, files))
  keep = [i for i, image in enumerate(decoded) if image is not None]
  if len(keep) < len(files):
    bad = [files[i] for i, image in enumerate(decoded) if image is None]
    logging.warning('skipped %d unreadable files (data.skip_bad_files=True), e.g. %s',
                    len(bad), bad[:3])
  if not keep:
    raise ValueError(f'no readable images among {len(files)} files, e.g. {files[:3]}')
  emptied = sorted(set(labels.tolist()) - set(labels[keep].tolist()))
  if emptied:
    # A class with no images left would still get an output unit and never be seen.
    folder = os.path.dirname(files[labels.tolist().index(emptied[0])])
    raise ValueError(f'every image of class folder {folder} is unreadable')
  images = np.stack([decoded[i] for i in keep])
  return images, labels[keep]


def _cache_key(files, size) -> str:
  digest = hashlib.sha1()
  for f in files:
    digest.update(f.encode())
    digest.update(str(os.path.getsize(f)).encode())
  digest.update(str(size).encode())
  return digest.hexdigest()[:16]


def load_folder_split(root, split, size, cache_dir='', skip_bad_files=False):
  """A split of an image folder as (images, labels, class_names), via a decoded cache."""
  files, labels, classes = list_folder_split(root, split)
  images, labels = load_files(files, labels, f'{root}/{split}', size, cache_dir, skip_bad_files)
  return images, labels, classes


def load_files(files, labels, name, size, cache_dir='', skip_bad_files=False):
  """Decoded (images, labels) of `files`, cached under cache_dir keyed on the file list."""
  cache = None
  if cache_dir:
    cache_dir = os.path.expanduser(cache_dir)
    split = os.path.basename(name)
    cache = os.path.join(cache_dir, 'decoded', f'{split}-{size}px-{_cache_key(files, size)}')
    if os.path.exists(cache + '.labels.npy'):
      return np.load(cache + '.images.npy'), np.load(cache + '.labels.npy')
  logging.info('decoding %d images of %s at %dpx', len(files), name, size)
  images, labels = decode_files(files, labels, size, skip_bad_files)
  if cache:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    # Write-then-rename, labels last: a killed run never leaves a cache that looks whole.
    for suffix, array in (('.images.npy', images), ('.labels.npy', labels)):
      tmp = f'{cache}.{os.getpid()}.tmp.npy'
      np.save(tmp, array)
      os.replace(tmp, cache + suffix)
  return images, labels


def load_tfds_split(name, split, size):
  """A tfds split as numpy (downloads on first use; needs internet)."""
  import tensorflow as tf  # Imported here: only this source needs TensorFlow.
  import tensorflow_datasets as tfds
  ds, info = tfds.load(name, split=split, as_supervised=True, with_info=True)

  def resize(image, label):
    image = tf.image.grayscale_to_rgb(image) if image.shape[-1] == 1 else image
    if image.shape[0] != size or image.shape[1] != size:
      shorter = tf.reduce_min(tf.shape(image)[:2])
      scale = size / tf.cast(shorter, tf.float32)
      new_hw = tf.cast(tf.math.ceil(tf.cast(tf.shape(image)[:2], tf.float32) * scale), tf.int32)
      image = tf.image.resize(image, new_hw, method='bicubic', antialias=True)
      image = tf.image.resize_with_crop_or_pad(image, size, size)
      image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return image, label
  ds = ds.map(resize, num_parallel_calls=tf.data.AUTOTUNE).batch(1024)
  images, labels = zip(*tfds.as_numpy(ds))
  classes = tuple(info.features['label'].names)
  return np.concatenate(images), np.concatenate(labels).astype(np.int32), classes


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
    return load_tfds_split(arg, split, size)
  return load_folder_split(arg, split, size, data_config.cache_dir, data_config.skip_bad_files)


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


def load_dataset(data_config, process_index: int = 0, process_count: int = 1) -> Dataset:
  """Train / val / test splits in memory: all of them with one process, this process's
  shard of each with several. The val split is carved from train with
  `split_seed`, so it is the same on every device, process and rerun."""
  if data_config.dataset not in DATASETS:
    raise ValueError(f'data.dataset={data_config.dataset!r} is unknown; allowed: {DATASETS}')
  num_shards = num_data_shards(data_config, process_count)
  kind, root = parse_source(data_config.source)
  if process_count > 1 and kind == 'folder':
    return _load_folder_shard(data_config, root, process_index, process_count)
  # One process, or tfds (which has no cheap way to read labels alone): load every
  # example, then keep this process's part.
  train_images, train_labels, classes = load_split(data_config, data_config.train_split)
  test_images, test_labels, test_classes = load_split(data_config, data_config.test_split)
  _check_same_classes(data_config, classes, test_classes)
  (own_train, own_val, own_test), sizes = _own_examples(train_labels, len(test_labels), data_config,
                                                        process_index, process_count)
  train, test = Split(train_images, train_labels), Split(test_images, test_labels)
  return Dataset(train.take(own_train), train.take(own_val), test.take(own_test), classes,
                 num_shards, process_index, process_count, sizes)


def _load_folder_shard(data_config, root, process_index, process_count) -> Dataset:
  """One process's shard of an image folder: the file lists decide the split for every
  process alike, and only this process's images are decoded."""
  if data_config.skip_bad_files:
    raise ValueError('data.skip_bad_files=True needs one process: with several, every process '
                     'must see the same file list; remove the unreadable files instead')
  size = storage_size(data_config)
  train_files, train_labels, classes = list_folder_split(root, data_config.train_split)
  test_files, test_labels, test_classes = list_folder_split(root, data_config.test_split)
  _check_same_classes(data_config, classes, test_classes)
  (own_train, own_val, own_test), sizes = _own_examples(train_labels, len(test_labels), data_config,
                                                        process_index, process_count)
  parts = {}
  for split, files, labels, wanted in (
      (data_config.train_split, train_files, train_labels, (own_train, own_val)),
      (data_config.test_split, test_files, test_labels, (own_test,))):
    rows = np.unique(np.concatenate(wanted))
    images, kept_labels = load_files([files[i] for i in rows], labels[rows],
                                     f'{root}/{split}', size, data_config.cache_dir)
    local = Split(images, kept_labels)
    parts[split] = [local.take(np.searchsorted(rows, idx)) for idx in wanted]
  (train, val), (test,) = parts[data_config.train_split], parts[data_config.test_split]
  return Dataset(train, val, test, classes, process_count, process_index, process_count, sizes)


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


def train_batches(split: Split, batch_size: int, seed: int, epoch: int, shards=(0,),
                  num_steps: int | None = None, first_index: int = 0) -> Iterator[dict]:
  """One epoch of this process's parts of the global batches, every example once.

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
  """
  per_shard = batch_size // len(shards)
  orders = []
  for j, shard_id in enumerate(shards):
    positions = np.arange(j, len(split), len(shards))
    # Shard 0 keeps the key (seed, epoch) alone: the order one process has always used,
    # so runs checkpointed before data shards existed resume with the very batches an
    # uninterrupted run of theirs would have seen (fault_drill.py checks resumes bit for bit).
    key = [seed, epoch] if shard_id == 0 else [seed, epoch, shard_id]
    orders.append(positions[np.random.default_rng(key).permutation(len(positions))])
  if num_steps is None:
    num_steps = -(-max(len(o) for o in orders) // per_shard)
  for i in range(num_steps):
    parts = [_padded_slice(o, i * per_shard, per_shard) for o in orders]
    # Each shard's part is mixed by the same permutation, so one process holding every
    # shard feeds each device the very rows that one process per shard would.
    mixed = np.random.default_rng([seed, epoch, i, _MIX_KEY]).permutation(per_shard)
    rows = np.concatenate([idx[mixed] for idx, _ in parts])
    index = np.concatenate([j * per_shard + mixed for j in range(len(parts))])
    yield {'image': split.images[rows], 'label': split.labels[rows],
           'mask': np.concatenate([mask[mixed] for _, mask in parts]),
           'index': (first_index + index).astype(np.int32)}


def _padded_slice(order: np.ndarray, start: int, size: int) -> tuple[np.ndarray, np.ndarray]:
  """order[start:start + size] (sorted: a faster gather of the same set), filled up past the
  end of `order` with its first entries again; (indices, mask), mask 0 on the fill."""
  positions = np.arange(start, start + size)
  idx = order[positions % len(order)]
  mask = (positions < len(order)).astype(np.float32)
  by_index = np.argsort(idx, kind='stable')
  return idx[by_index], mask[by_index]


def eval_batches(split: Split, batch_size: int, num_batches: int | None = None) -> Iterator[dict]:
  """Every example once, then fully padded batches up to `num_batches` (so that every
  process runs as many steps); `mask` is 0 on the padding."""
  if num_batches is None:
    num_batches = -(-len(split) // batch_size)
  for start in range(0, num_batches * batch_size, batch_size):
    images = split.images[start:start + batch_size]
    labels = split.labels[start:start + batch_size]
    pad = batch_size - len(labels)
    mask = np.concatenate([np.ones(len(labels), np.float32), np.zeros(pad, np.float32)])
    if pad:
      images = np.concatenate([images, np.zeros((pad, *split.images.shape[1:]), np.uint8)])
      labels = np.concatenate([labels, np.zeros(pad, np.int32)])
    yield {'image': images, 'label': labels, 'mask': mask}


def shard(batch: dict, num_devices: int) -> dict:
  """[global, ...] -> [devices, per_device, ...], for pmap."""
  def reshape(x):
    if x.shape[0] % num_devices:
      raise ValueError(f'batch of {x.shape[0]} does not split over {num_devices} devices')
    return x.reshape(num_devices, x.shape[0] // num_devices, *x.shape[1:])
  return {k: reshape(v) for k, v in batch.items()}
