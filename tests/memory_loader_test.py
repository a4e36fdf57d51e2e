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
  split, classes = memory_loader.load_folder_split(str(tmp_path), 'train', 16)
  assert split.images.shape == (2, 16, 16, 3) and classes == ('a',)


def test_bad_file_is_named_or_skipped(tmp_path):
  os.makedirs(tmp_path / 'train' / 'a')
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(
    tmp_path / 'train' / 'a' / 'ok.png'
  )
  (tmp_path / 'train' / 'a' / 'broken.jpg').write_bytes(b'not an image')
  with pytest.raises(ValueError, match='broken.jpg'):
    memory_loader.load_folder_split(str(tmp_path), 'train', 8)
  split, _ = memory_loader.load_folder_split(
    str(tmp_path), 'train', 8, skip_bad_files=True
  )
  # The file keeps its row (sorted names: broken.jpg is row 0), marked unreadable: a batch
  # gives it weight 0.
  assert len(split) == 2 and split.readable.tolist() == [False, True]
  batch = split.gather(
    {'rows': np.array([1, 0]), 'mask': np.ones(2, np.float32)}
  )
  assert batch['mask'].tolist() == [1.0, 0.0]


def test_a_cached_split_keeps_its_unreadable_rows(tmp_path, monkeypatch):
  os.makedirs(tmp_path / 'train' / 'a')
  for i in range(2):
    Image.fromarray(np.full((8, 8, 3), 9 * i, np.uint8)).save(
      tmp_path / 'train' / 'a' / f'{i}.png'
    )
  (tmp_path / 'train' / 'a' / '2.jpg').write_bytes(b'not an image')
  cache_dir = str(tmp_path / 'cache')
  first, _ = memory_loader.load_folder_split(
    str(tmp_path), 'train', 8, cache_dir, skip_bad_files=True
  )
  decode = memory_loader.decode_files
  monkeypatch.setattr(
    memory_loader, 'decode_files', None
  )  # read back, no decoding
  again, _ = memory_loader.load_folder_split(
    str(tmp_path), 'train', 8, cache_dir, skip_bad_files=True
  )
  assert (
    again.readable.tolist() == first.readable.tolist() == [True, True, False]
  )
  # Without skip_bad_files the cache is not taken for a readable split: decoding names it.
  monkeypatch.setattr(memory_loader, 'decode_files', decode)
  with pytest.raises(ValueError, match='2.jpg'):
    memory_loader.load_folder_split(str(tmp_path), 'train', 8, cache_dir)


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
  np.testing.assert_array_equal(first[0].images, again[0].images)
  np.testing.assert_array_equal(first[0].labels, again[0].labels)


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
    lambda files, labels, size, *args: memory_loader.Split(
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
