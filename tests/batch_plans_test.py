import numpy as np

from conftest import tiny_config
from rotjax import batch_plans
from rotjax import input_pipeline
from rotjax import memory_loader
from rotjax import parallel


def test_batches_are_keyed_on_seed_and_epoch(image_folder, tmp_path):
  ds = input_pipeline.load_dataset(
    tiny_config('supervised', tmp_path, image_folder).data
  )
  first = [b['label'] for b in batch_plans.train_batches(ds.train, 8, 0, 1)]
  again = [b['label'] for b in batch_plans.train_batches(ds.train, 8, 0, 1)]
  other = [b['label'] for b in batch_plans.train_batches(ds.train, 8, 0, 2)]
  assert len(first) == -(
    -len(ds.train) // 8
  )  # the last batch padded, not dropped
  np.testing.assert_array_equal(np.stack(first), np.stack(again))
  assert not np.array_equal(np.stack(first), np.stack(other))
  sharded = parallel.shard(
    next(batch_plans.train_batches(ds.train, 8, 0, 1)), 2
  )
  assert sharded['image'].shape == (2, 4, 16, 16, 3)


def test_one_shard_keeps_the_seeded_order(image_folder, tmp_path):
  ds = input_pipeline.load_dataset(
    tiny_config('supervised', tmp_path, image_folder).data
  )
  order = np.random.default_rng([3, 2]).permutation(len(ds.train))
  batch = next(batch_plans.train_batches(ds.train, 8, 3, 2))
  # Row r holds the batch's index[r]-th image in index order (the rows are then mixed).
  np.testing.assert_array_equal(
    batch['label'], ds.train.labels[np.sort(order[:8])][batch['index']]
  )


def _seen(batches) -> list[int]:
  """Labels (here: example ids) of the real rows of an epoch's batches."""
  return sorted(int(x) for b in batches for x in b['label'][b['mask'] == 1])


def test_every_labelled_image_is_seen_once_per_epoch_the_padding_masked():
  """200 labels at batch 128 dropped 72 of them every epoch; scaled down: 25 at batch 16."""
  n, batch = 25, 16
  ids = np.arange(n, dtype=np.int32)
  split = memory_loader.Split(
    np.broadcast_to(ids[:, None, None, None], (n, 2, 2, 3)).astype(np.uint8),
    ids,
  )
  for num_shards in (1, 2):
    dataset = input_pipeline.Dataset(
      split, split, split, ('a',), num_shards=num_shards
    )
    assert dataset.steps_per_epoch(batch) == 2
  for shards in ((0,), (0, 1)):
    for epoch in (1, 2):
      batches = list(batch_plans.train_batches(split, batch, 0, epoch, shards))
      assert len(batches) == 2 and all(
        b['image'].shape[0] == batch for b in batches
      )
      assert _seen(batches) == list(range(n))
      last = batches[-1]
      assert (
        last['mask'].sum() == n - batch
        and (last['mask'] == 0).sum() == 2 * batch - n
      )
      # The padding repeats real images of the epoch (their own labels), never zeros.
      padded = last['mask'] == 0
      np.testing.assert_array_equal(
        last['image'][padded][:, 0, 0, 0], last['label'][padded]
      )
      assert (
        len(set(last['label'][padded].tolist()) & set(_seen(batches[:1])))
        == 2 * batch - n
      )
  # Two processes, one shard each (13 and 12 images): as many steps, each image once.
  parts = [split.take(np.arange(p, n, 2)) for p in (0, 1)]
  two = [
    list(
      batch_plans.train_batches(
        part, batch // 2, 0, 1, (p,), 2, first_index=p * batch // 2
      )
    )
    for p, part in enumerate(parts)
  ]
  assert [len(b) for b in two] == [2, 2]
  assert sorted(_seen(two[0]) + _seen(two[1])) == list(range(n))
  one = list(batch_plans.train_batches(split, batch, 0, 1, (0, 1)))
  # The same images at the same global indices (so the same augmentation); each process
  # mixes only the rows it holds, so the rows' order differs.
  by_index = lambda b: {k: v[np.argsort(b['index'])] for k, v in b.items()}
  for a, b0, b1 in zip(one, *two):
    joined = by_index({k: np.concatenate([b0[k], b1[k]]) for k in a})
    for key in ('label', 'mask', 'index'):
      np.testing.assert_array_equal(by_index(a)[key], joined[key])


def test_each_device_holds_a_uniform_random_part_of_every_batch():
  # 500 images listed class by class, as a folder split is: in index order device 0 of 2
  # would hold mostly classes 0-4, and per-device BatchNorm would see the labels.
  labels = np.repeat(np.arange(10), 50).astype(np.int32)
  split = memory_loader.Split(np.zeros((500, 2, 2, 3), np.uint8), labels)
  for epoch in (1, 2, 3):
    batches = list(batch_plans.train_batches(split, 64, 0, epoch))
    assert _seen(batches) == sorted(labels.tolist())
    for batch in batches:
      devices = parallel.shard(batch, 2)
      for device in range(2):
        real = devices['label'][device][devices['mask'][device] == 1]
        assert len(set(real.tolist())) >= 8, (epoch, device)
      # Every row keeps its own place in the batch as its index, whichever device holds it.
      assert sorted(batch['index'].tolist()) == list(range(64))


def test_eval_batches_pad_and_mask():
  split = memory_loader.Split(
    np.zeros((10, 4, 4, 3), np.uint8), np.arange(10, dtype=np.int32)
  )
  batches = list(batch_plans.eval_batches(split, 4))
  assert len(batches) == 3
  assert batches[-1]['mask'].tolist() == [1, 1, 0, 0]
  assert sum(b['mask'].sum() for b in batches) == 10
