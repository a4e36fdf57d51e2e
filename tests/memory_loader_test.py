import os

import numpy as np
import pytest
from PIL import Image

from rotjax import memory_loader


def test_grayscale_rgba_and_odd_sizes_are_converted(tmp_path):
  os.makedirs(tmp_path / 'train' / 'a')
  Image.fromarray(np.full((20, 30), 128, np.uint8), 'L').save(
    tmp_path / 'train' / 'a' / 'g.png'
  )
  Image.fromarray(np.full((40, 17, 4), 200, np.uint8), 'RGBA').save(
    tmp_path / 'train' / 'a' / 'r.png'
  )
  images, labels, classes = memory_loader.load_folder_split(
    str(tmp_path), 'train', 16
  )
  assert images.shape == (2, 16, 16, 3) and classes == ('a',)


def test_bad_file_is_named_or_skipped(tmp_path):
  os.makedirs(tmp_path / 'train' / 'a')
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(
    tmp_path / 'train' / 'a' / 'ok.png'
  )
  (tmp_path / 'train' / 'a' / 'broken.jpg').write_bytes(b'not an image')
  with pytest.raises(ValueError, match='broken.jpg'):
    memory_loader.load_folder_split(str(tmp_path), 'train', 8)
  images, _, _ = memory_loader.load_folder_split(
    str(tmp_path), 'train', 8, skip_bad_files=True
  )
  assert len(images) == 1


def test_class_with_only_bad_files_is_an_error_even_when_skipping(tmp_path):
  os.makedirs(tmp_path / 'train' / 'a')
  os.makedirs(tmp_path / 'train' / 'b')
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(
    tmp_path / 'train' / 'a' / '0.png'
  )
  (tmp_path / 'train' / 'b' / 'x.jpg').write_bytes(b'not an image')
  with pytest.raises(
    ValueError, match=r'every image of class folder .*train/b is unreadable'
  ):
    memory_loader.load_folder_split(
      str(tmp_path), 'train', 8, skip_bad_files=True
    )


def test_a_decoded_split_is_read_back_from_its_cache(tmp_path, monkeypatch):
  os.makedirs(tmp_path / 'train' / 'a')
  for i in range(3):
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(
      tmp_path / 'train' / 'a' / f'{i}.png'
    )
  cache_dir = str(tmp_path / 'cache')
  first = memory_loader.load_folder_split(str(tmp_path), 'train', 8, cache_dir)

  def decode_again(*args, **kwargs):
    raise AssertionError('decoded again: the cache was not found')

  monkeypatch.setattr(memory_loader, 'decode_files', decode_again)
  again = memory_loader.load_folder_split(str(tmp_path), 'train', 8, cache_dir)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)


def test_a_cache_keeps_its_place_and_name(tmp_path, monkeypatch):
  """Named after the split, the image size and a key of each file's name and size: a name
  that changed would decode every cache already on disk again (ImageNette: minutes)."""
  os.makedirs(tmp_path / 'train' / 'a')
  (tmp_path / 'train' / 'a' / '0.png').write_bytes(b'x' * 10)
  (tmp_path / 'train' / 'a' / '1.png').write_bytes(b'y' * 4)
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(
    memory_loader,
    'decode_files',
    lambda files, labels, size, *args: (
      np.zeros((len(files), size, size, 3), np.uint8),
      np.asarray(labels, np.int32),
    ),
  )
  memory_loader.load_files(
    ['train/a/0.png', 'train/a/1.png'],
    [0, 0],
    'folder/train',
    16,
    str(tmp_path / 'cache'),
  )
  assert sorted(os.listdir(tmp_path / 'cache' / 'decoded')) == [
    'train-16px-cf1c846ad223d8c1.images.npy',
    'train-16px-cf1c846ad223d8c1.labels.npy',
  ]
