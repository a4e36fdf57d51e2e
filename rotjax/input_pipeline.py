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
  train: Split
  val: Split
  test: Split
  class_names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


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
  cache = None
  if cache_dir:
    cache_dir = os.path.expanduser(cache_dir)
    cache = os.path.join(cache_dir, 'decoded', f'{split}-{size}px-{_cache_key(files, size)}')
    if os.path.exists(cache + '.labels.npy'):
      return np.load(cache + '.images.npy'), np.load(cache + '.labels.npy'), classes
  logging.info('decoding %d images of %s/%s at %dpx', len(files), root, split, size)
  images, labels = decode_files(files, labels, size, skip_bad_files)
  if cache:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    # Write-then-rename, labels last: a killed run never leaves a cache that looks whole.
    for suffix, array in (('.images.npy', images), ('.labels.npy', labels)):
      tmp = f'{cache}.{os.getpid()}.tmp.npy'
      np.save(tmp, array)
      os.replace(tmp, cache + suffix)
  return images, labels, classes


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


def load_dataset(data_config) -> Dataset:
  """Train / val / test splits in memory. The val split is carved from train with
  `split_seed`, so it is the same on every device, process and rerun."""
  if data_config.dataset not in DATASETS:
    raise ValueError(f'data.dataset={data_config.dataset!r} is unknown; allowed: {DATASETS}')
  train_images, train_labels, classes = load_split(data_config, data_config.train_split)
  test_images, test_labels, test_classes = load_split(data_config, data_config.test_split)
  if classes != test_classes:
    raise ValueError(f'class names differ between splits {data_config.train_split!r} {classes} '
                     f'and {data_config.test_split!r} {test_classes}')
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
  test_idx = np.arange(len(test_labels))
  if data_config.max_eval_images:
    val_idx = val_idx[:data_config.max_eval_images]
    test_idx = rng.permutation(test_idx)[:data_config.max_eval_images]
  train = Split(train_images, train_labels)
  test = Split(test_images, test_labels)
  return Dataset(train.take(train_idx), train.take(np.sort(val_idx)),
                 test.take(np.sort(test_idx)), classes)


# ---------------------------------------------------------------- batching

def train_batches(split: Split, batch_size: int, seed: int, epoch: int) -> Iterator[dict]:
  """One epoch of full batches; the order depends only on (seed, epoch), so a
  resumed run sees exactly the batches an uninterrupted one would."""
  order = np.random.default_rng([seed, epoch]).permutation(len(split))
  for start in range(0, len(order) - batch_size + 1, batch_size):
    idx = np.sort(order[start:start + batch_size])  # sorted: faster gather, same set
    yield {'image': split.images[idx], 'label': split.labels[idx]}


def eval_batches(split: Split, batch_size: int) -> Iterator[dict]:
  """Every example once; the last batch is padded, with `mask` 0 on the padding."""
  for start in range(0, len(split), batch_size):
    images = split.images[start:start + batch_size]
    labels = split.labels[start:start + batch_size]
    pad = batch_size - len(labels)
    mask = np.concatenate([np.ones(len(labels), np.float32), np.zeros(pad, np.float32)])
    if pad:
      images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
      labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    yield {'image': images, 'label': labels, 'mask': mask}


def shard(batch: dict, num_devices: int) -> dict:
  """[global, ...] -> [devices, per_device, ...], for pmap."""
  def reshape(x):
    if x.shape[0] % num_devices:
      raise ValueError(f'batch of {x.shape[0]} does not split over {num_devices} devices')
    return x.reshape(num_devices, x.shape[0] // num_devices, *x.shape[1:])
  return {k: reshape(v) for k, v in batch.items()}
