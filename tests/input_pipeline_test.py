import os

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from rotjax import batch_plans
from rotjax import image_files
from rotjax import example_selection
from rotjax import input_pipeline
from rotjax import memory_loader


def test_folder_dataset_splits_and_shapes(image_folder, tmp_path):
  config = tiny_config('supervised', tmp_path, image_folder)
  ds = input_pipeline.load_dataset(config.data)
  assert ds.class_names == ('circle', 'square', 'stripes')
  assert len(ds.train) + len(ds.val) == 72 and len(ds.val) == 18
  assert len(ds.test) == 24
  assert ds.train.images.dtype == np.uint8 and ds.train.images.shape[1:] == (
    16,
    16,
    3,
  )
  # The validation split is seeded: identical on a rerun.
  again = input_pipeline.load_dataset(config.data)
  np.testing.assert_array_equal(ds.val.images, again.val.images)


def test_samples_per_class_is_balanced_and_seeded(image_folder, tmp_path):
  config = tiny_config('supervised', tmp_path, image_folder)
  config.data.samples_per_class = 5
  ds = input_pipeline.load_dataset(config.data)
  assert np.bincount(ds.train.labels).tolist() == [5, 5, 5]
  np.testing.assert_array_equal(
    ds.train.images, input_pipeline.load_dataset(config.data).train.images
  )
  config.data.samples_per_class = 100
  with pytest.raises(ValueError, match='samples_per_class=100 is larger'):
    input_pipeline.load_dataset(config.data)


def test_each_process_decodes_only_its_shard(image_folder, tmp_path):
  """Two processes' shards: disjoint, together the whole dataset, and their parts of each
  batch join into the batches of one process holding both shards (data.num_shards=2)."""
  config = tiny_config('supervised', tmp_path, image_folder)
  config.data.cache_dir = str(tmp_path / 'cache')
  config.data.num_shards = 2
  whole = input_pipeline.load_dataset(config.data)
  config.data.num_shards = 0
  parts = [input_pipeline.load_dataset(config.data, p, 2) for p in (0, 1)]
  for split in ('train', 'val', 'test'):
    assert (
      parts[0].size(split) == parts[1].size(split) == len(getattr(whole, split))
    )
    joined = np.concatenate([getattr(p, split).images for p in parts])
    assert len(joined) == len(getattr(whole, split))
    key = lambda images: sorted(x.tobytes() for x in images)  # noqa: E731
    assert key(joined) == key(getattr(whole, split).images)
  # Each process decoded (and cached) only its own train+val and test images.
  cached = sorted(os.listdir(tmp_path / 'cache' / 'decoded'))
  sizes = sorted(
    np.load(tmp_path / 'cache' / 'decoded' / f, mmap_mode='r').shape[0]
    for f in cached
    if f.endswith('.labels.npy')
  )
  assert sizes == [12, 12, 24, 36, 36, 72], (
    sizes
  )  # test and train+val: per process, whole
  steps = whole.steps_per_epoch(8)
  assert steps == parts[0].steps_per_epoch(8) == -(-54 // 8)
  for epoch in (1, 2):
    one = list(
      batch_plans.train_batches(whole.train, 8, 0, epoch, whole.shards, steps)
    )
    two = [
      list(
        batch_plans.train_batches(
          p.train, 4, 0, epoch, p.shards, steps, first_index=4 * p.process_index
        )
      )
      for p in parts
    ]
    assert len(one) == steps
    # Row for row the batches two processes feed their devices (images, labels, padding,
    # indices): one host with num_shards=2 replays a two-host run exactly.
    for a, b0, b1 in zip(one, *two):
      for key in ('image', 'label', 'mask', 'index'):
        np.testing.assert_array_equal(
          a[key], np.concatenate([b0[key], b1[key]]), err_msg=key
        )
  # Evaluation: every process runs as many batches, the padding masked out.
  counts = [p.eval_steps('val', 4) for p in parts]
  assert (
    counts[0] == counts[1] == 5
  )  # 18 val images: 9 per process, 2 per batch
  masks = [
    sum(b['mask'].sum() for b in batch_plans.eval_batches(p.val, 2, 5))
    for p in parts
  ]
  assert masks == [9, 9]


def test_shards_must_match_the_processes(image_folder, tmp_path):
  config = tiny_config('supervised', tmp_path, image_folder)
  config.data.num_shards = 3
  with pytest.raises(ValueError, match='data.num_shards=3 with 2 processes'):
    input_pipeline.load_dataset(config.data, 0, 2)


def test_empty_class_and_mismatched_classes_are_errors(tmp_path):
  os.makedirs(tmp_path / 'train' / 'empty')
  with pytest.raises(ValueError, match='is empty'):
    image_files.list_folder_split(str(tmp_path), 'train')
  with pytest.raises(ValueError, match='unknown'):
    input_pipeline.parse_source('http://x')


def _folder(root, layout):
  """layout: {'train/a': ['x.png', 'bad.jpg', ...]}; *.png are images, anything else is junk."""
  for folder, names in layout.items():
    os.makedirs(root / folder, exist_ok=True)
    for name in names:
      if name.endswith('.png'):
        Image.fromarray(np.full((8, 8, 3), 50, np.uint8)).save(
          root / folder / name
        )
      else:
        (root / folder / name).write_bytes(b'not an image')
  return root


def _data_config(root, **overrides):
  config = tiny_config('supervised', root / 'run', str(root))
  for key, value in overrides.items():
    config.data[key] = value
  return config.data


def test_non_image_file_is_named(tmp_path):
  _folder(tmp_path, {'train/a': ['0.png', 'notes.txt'], 'test/a': ['0.png']})
  with pytest.raises(
    ValueError, match=r'cannot read image .*notes.txt.*skip_bad_files=True'
  ):
    input_pipeline.load_dataset(_data_config(tmp_path, val_fraction=0.0))


def test_skipped_files_are_counted_in_a_warning(tmp_path, caplog):
  _folder(
    tmp_path,
    {
      'train/a': ['0.png', '1.png', 'x.jpg'],
      'train/b': ['0.png', 'y.jpg'],
      'test/a': ['0.png'],
      'test/b': ['0.png'],
    },
  )
  with caplog.at_level('WARNING'):
    ds = input_pipeline.load_dataset(
      _data_config(tmp_path, val_fraction=0.0, skip_bad_files=True)
    )
  # The unreadable files keep their rows (as the streaming loader's), marked unreadable.
  assert len(ds.train) == 5 and ds.class_names == ('a', 'b')
  assert ds.train.readable.sum() == 3
  assert 'skipped 2 unreadable files' in caplog.text and 'x.jpg' in caplog.text


def test_class_names_differing_between_splits_are_an_error(tmp_path):
  _folder(
    tmp_path,
    {
      'train/cat': ['0.png'],
      'train/dog': ['0.png'],
      'test/cat': ['0.png'],
      'test/dgo': ['0.png'],
    },
  )
  with pytest.raises(
    ValueError,
    match=r"class names differ between splits 'train' \('cat', 'dog'\) "
    r"and 'test' \('cat', 'dgo'\)",
  ):
    input_pipeline.load_dataset(_data_config(tmp_path))


@pytest.mark.parametrize(
  'layout,message',
  [
    (
      {'train/a': ['0.png'], 'test': []},
      r'split folder .*test has no class sub-folders',
    ),
    ({'train/a': ['0.png'], 'test/a': []}, r'class folder .*test/a is empty'),
    (
      {'train/a': ['0.png'], 'test/a': ['.DS_Store']},
      r'class folder .*test/a is empty',
    ),
    ({'train/a': ['0.png']}, r"data.source folder has no split 'test'"),
  ],
  ids=['no_classes', 'empty_class', 'only_hidden_files', 'missing_split'],
)
def test_split_without_images_is_an_error(tmp_path, layout, message):
  _folder(tmp_path, layout)
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    input_pipeline.load_dataset(_data_config(tmp_path))


def test_memory_loader_decodes_only_the_images_the_run_holds(
  image_folder, tmp_path, monkeypatch
):
  """A capped run on a large folder decodes its few images, not the folder (and auto
  decides on them)."""
  config = tiny_config(
    'supervised',
    tmp_path,
    image_folder,
    **{'data.max_train_images': 5, 'data.max_eval_images': 4},
  )
  decoded = []
  real = memory_loader.decode_files
  monkeypatch.setattr(
    memory_loader,
    'decode_files',
    lambda files, *args, **kw: (
      decoded.append(len(files)) or real(files, *args, **kw)
    ),
  )
  dataset = input_pipeline.load_dataset(config.data)
  assert (
    decoded == [5 + 4, 4] and dataset.loader == 'memory'
  )  # train + val rows, test rows
  assert dataset.loader_reason.startswith('auto: 13 images at 16 px')
  files, labels, _ = image_files.list_folder_split(image_folder, 'train')
  train_idx, _, _ = example_selection.select_examples(labels, 24, config.data)
  np.testing.assert_array_equal(
    dataset.train.images,
    np.stack([image_files.decode_image(files[i], 16) for i in train_idx]),
  )
