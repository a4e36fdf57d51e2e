"""Which examples a run uses: the seeded validation split carved from train, a balanced subset
of labels per class, capped evaluation splits, and each process's share of every split."""

import numpy as np


def balanced_subset(labels, per_class, order) -> np.ndarray:
  """The first `per_class` indices of each class, in the seeded `order`."""
  chosen = []
  for c in np.unique(labels):
    in_class = order[labels[order] == c]
    if per_class > len(in_class):
      raise ValueError(
        f'data.samples_per_class={per_class} is larger than class {c} has '
        f'({len(in_class)} training images after the validation split)'
      )
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
    train_order = train_order[: data_config.max_train_images]
  if data_config.samples_per_class:
    train_idx = balanced_subset(
      train_labels, data_config.samples_per_class, train_order
    )
  else:
    train_idx = np.sort(train_order)
  test_idx = np.arange(num_test)
  if data_config.max_eval_images:
    val_idx = val_idx[: data_config.max_eval_images]
    test_idx = rng.permutation(test_idx)[: data_config.max_eval_images]
  return train_idx, np.sort(val_idx), np.sort(test_idx)


def own_examples(
  train_labels,
  num_test: int,
  data_config,
  process_index: int,
  process_count: int,
):
  """((train, val, test) indices this process holds, {split: size of the whole split}).

  The split is decided from the labels alone, the same in every process; process p then
  holds every process_count-th example of each split from p on."""
  train_idx, val_idx, test_idx = select_examples(
    train_labels, num_test, data_config
  )
  own = tuple(
    i[process_index::process_count] for i in (train_idx, val_idx, test_idx)
  )
  return own, {
    'train': len(train_idx),
    'val': len(val_idx),
    'test': len(test_idx),
  }
