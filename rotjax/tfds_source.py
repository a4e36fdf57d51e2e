"""Reading tfds datasets (`data.source=tfds:NAME`): whole splits, their labels, their sizes.

tensorflow_datasets is imported inside each function: only this source needs TensorFlow.
The records' images stay encoded here and are decoded by PIL (image_files), as a folder's
files are; the streaming loader reads the same records through TfdsReader (below).
"""

import concurrent.futures
import logging
import os

import numpy as np

from rotjax import image_files
from rotjax import streaming


def load_split(name, split, size, data_dir=''):
  """A tfds split as numpy (downloads on first use; needs internet). Images are kept
  encoded by tfds and decoded by PIL here, as a folder's files and the streaming loader's
  records are: one resampling (image_files.fit_square) for every source and loader."""
  import tensorflow_datasets as tfds

  try:  # prepared as ArrayRecord (tfds.load cannot read those): its random-access source
    source = open_tfds_source(name, split, data_dir)
    records, info = [source[i] for i in range(len(source))], source.dataset_info
  except ValueError:  # TFRecord, or not here yet: tfds.load prepares it
    ds, info = tfds.load(
      name,
      split=split,
      with_info=True,
      data_dir=data_dir or None,
      decoders={'image': tfds.decode.SkipDecoding()},
    )
    records = list(tfds.as_numpy(ds))
  with concurrent.futures.ThreadPoolExecutor(
    streaming.available_cores()
  ) as pool:
    images = list(
      pool.map(lambda r: image_files.decode_bytes(r['image'], size), records)
    )
  labels = np.asarray([r['label'] for r in records], np.int32)
  return np.stack(images), labels, tuple(info.features['label'].names)


def read_labels(name, split, data_dir='', cache_dir=''):
  """(labels, class names) of a prepared tfds split, read once from its records through
  tfds.data_source (images left encoded) and cached under cache_dir."""
  source = open_tfds_source(name, split, data_dir)
  classes = tuple(source.dataset_info.features['label'].names)
  cache = ''
  if cache_dir:
    cache = os.path.join(
      os.path.expanduser(cache_dir),
      'tfds-labels',
      f'{name.replace("/", "_")}-{split}-{len(source)}.npy',
    )
    if os.path.exists(cache):
      return np.load(cache), classes
  logging.info(
    'reading the labels of tfds:%s %s (%d records, once)',
    name,
    split,
    len(source),
  )
  labels = np.empty(len(source), np.int32)
  for start in range(0, len(source), 1024):
    chunk = range(start, min(start + 1024, len(source)))
    records = (
      source.__getitems__(list(chunk))
      if hasattr(source, '__getitems__')
      else [source[i] for i in chunk]
    )
    labels[start : start + len(chunk)] = [r['label'] for r in records]
  if cache:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = f'{cache}.{os.getpid()}.tmp.npy'
    np.save(tmp, labels)
    os.replace(tmp, cache)
  return labels, classes


def num_examples(name, splits, data_dir='') -> int | None:
  """Examples in `splits` of a tfds dataset where its metadata is on this machine, else None."""
  try:
    import tensorflow_datasets as tfds

    info = tfds.builder(name, data_dir=data_dir or None).info
    return sum(info.splits[split].num_examples for split in splits)
  except Exception:  # not prepared here (tfds.load would download it)
    return None


class TfdsReader:
  """Reads record i of a prepared tfds split through tfds's random-access data source
  (ArrayRecord files), its image decoded by PIL as a folder's files are. Opened on first
  use in each process (a worker unpickles this, not an open file)."""

  def __init__(self, name: str, split: str, data_dir: str = ''):
    self.name, self.split, self.data_dir = name, split, data_dir
    self._source = None

  def __getstate__(self):
    return {**self.__dict__, '_source': None}

  def source(self):
    if self._source is None:
      self._source = open_tfds_source(self.name, self.split, self.data_dir)
    return self._source

  def __call__(self, index: int, size: int) -> np.ndarray:
    try:
      return image_files.decode_bytes(self.source()[int(index)]['image'], size)
    except Exception as e:
      raise image_files.BadImageError(
        f'cannot read image of record {index} of tfds:{self.name} split {self.split!r}: '
        f'{e} (set data.skip_bad_files=True to skip such records)'
      ) from e


def open_tfds_source(name: str, split: str, data_dir: str = ''):
  """tfds.data_source of a prepared split, images left encoded (PIL decodes them)."""
  import tensorflow_datasets as tfds

  try:
    return tfds.data_source(
      name,
      split=split,
      data_dir=data_dir or None,
      download=False,
      decoders={'image': tfds.decode.SkipDecoding()},
    )
  except Exception as e:
    raise ValueError(
      f'data.loader=stream reads tfds:{name} through tfds.data_source, which needs the '
      f'dataset prepared in ArrayRecord format ({type(e).__name__}: {e}); prepare it with '
      f'`tfds build {name} --file_format=array_record` (or '
      'builder.download_and_prepare(file_format="array_record")), point data.data_dir at '
      'it, or use data.loader=memory'
    ) from e
