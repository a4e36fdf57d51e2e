"""Image files on disk: how a folder split is listed and how one file becomes a uint8 square.

Both loaders decode through `decode_image`, so the memory loader's cached arrays and the
streaming loader's batches hold the very same pixels. Nothing here imports JAX or Grain:
the streaming loader's worker processes import this module and nothing heavier.
"""

import io
import os

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (
  '.jpg',
  '.jpeg',
  '.png',
  '.bmp',
  '.gif',
  '.webp',
  '.tif',
  '.tiff',
)
# tfds calls ImageNette's held-out split 'validation'; image-folder copies call it 'val'.
SPLIT_ALIASES = {'validation': 'val', 'val': 'validation'}


class BadImageError(ValueError):
  """A file that is not a readable image; the message names it."""


def decode_image(path: str, size: int) -> np.ndarray:
  """One file -> uint8 [size, size, 3]: RGB-converted, shorter side resized, centre-cropped."""
  with Image.open(path) as image:
    return fit_square(
      image.convert('RGB'), size
    )  # grayscale, palette, RGBA -> RGB


def decode_bytes(data: bytes, size: int) -> np.ndarray:
  """An encoded image (JPEG, PNG: a tfds record's bytes) -> uint8 [size, size, 3], as decode_image."""
  with Image.open(io.BytesIO(data)) as image:
    return fit_square(image.convert('RGB'), size)


def read_image(path: str, size: int) -> np.ndarray:
  """decode_image, with any failure a BadImageError naming the file (PIL raises several
  types for corrupt or non-image files)."""
  try:
    return decode_image(path, size)
  except Exception as e:
    raise BadImageError(
      f'cannot read image {path}: {e} '
      '(set data.skip_bad_files=True to skip such files)'
    ) from e


def fit_square(image: Image.Image, size: int) -> np.ndarray:
  """RGB PIL image -> uint8 [size, size, 3]: shorter side resized (bicubic), centre-cropped."""
  width, height = image.size
  if (width, height) != (size, size):
    scale = size / min(width, height)
    new_w, new_h = (
      max(size, round(width * scale)),
      max(size, round(height * scale)),
    )
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    image = image.crop((left, top, left + size, top + size))
  return np.asarray(image, dtype=np.uint8)


def split_folder(root: str, split: str) -> str:
  """ROOT/SPLIT (or its alias: val <-> validation); an error names the folder it lacks."""
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir) and split in SPLIT_ALIASES:
    split_dir = os.path.join(root, SPLIT_ALIASES[split])
  if not os.path.isdir(split_dir):
    raise FileNotFoundError(
      f'data.source folder has no split {split!r}: {split_dir} does not exist'
    )
  return split_dir


def list_folder_split(
  root: str, split: str
) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
  """Files, integer labels and sorted class names of ROOT/SPLIT/CLASS/IMAGE (no file is
  opened: listing 200,000 files takes a second)."""
  split_dir = split_folder(root, split)
  with os.scandir(split_dir) as entries:
    classes = tuple(sorted(e.name for e in entries if e.is_dir()))
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
