"""The train and eval steps: pure functions of (state, batch, rng) on one device's rows of
the global batch, their collectives over the data-parallel axis (parallel.AXIS).

Stages differ only in `prepare_fn` (rotation labels for the pretext, class labels
otherwise) and in the freeze mask (freeze.py). One code path for one or many devices, and
for both ways of running them (data_parallel.py: jit over a device mesh, or pmap). No
config reads inside a step, no side effects: the loop around them (train.py) holds the
state, the data and the checkpoints.
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rotjax import parallel
from rotjax import preprocess
from rotjax import rotation


def make_prepare_fn(config, *, train: bool) -> Callable:
  """(batch, rng) -> (images, labels, weights): augmentation, rotation, normalisation.

  Example i draws every random number (crop, flip, direction, sub-pixel shift) from
  fold_in(rng, batch['index'][i]) (its place in the batch where there is no index):
  the steps pass its place in the global batch or in the split (with_index), so its
  images do not depend on how many devices or processes share the batch.
  """
  pretext = config.stage == 'pretext'
  geometry = config.rotation.geometry if pretext else None

  def prepare(batch, rng):
    count = batch['image'].shape[0]
    keys = jax.vmap(jax.random.fold_in, (None, 0))(
      rng, batch.get('index', jnp.arange(count))
    )
    aug_keys, rot_keys = preprocess.split_each(keys, 2)
    # The 'disc' pretext augments without pad-crop fill or stretch: their edges would
    # turn with the image and give N = 6 or 8 directions away (preprocess.py).
    images = preprocess.preprocess(
      batch['image'],
      aug_keys,
      train=train,
      style=config.data.preprocess,
      image_size=config.data.image_size,
      isotropic=geometry == 'disc',
    )
    weights = batch.get('mask', jnp.ones(count, jnp.float32))
    if not pretext:
      return images, batch['label'], weights
    num = config.rotation.num_rotations
    if train and config.rotation.mode == 'random':
      images, labels = rotation.rotate_random(images, num, rot_keys, geometry)
      return images, labels, weights
    # Eval always scores every direction of every image.
    images, labels = rotation.rotate_all(images, num, rot_keys, geometry)
    return images, labels, jnp.tile(weights, num)

  return prepare


def with_index(batch, axis_name=parallel.AXIS):
  """`batch` with each example's global index: the caller's (training: the place in the
  global batch before its rows were mixed; evaluate: the place in the split), else the
  place in the global batch (devices hold consecutive parts of it)."""
  if 'index' in batch:
    return batch
  count = batch['image'].shape[0]
  return {
    **batch,
    'index': jax.lax.axis_index(axis_name) * count + jnp.arange(count),
  }


def eval_key(seed: int):
  """The key every evaluation folds each example's index into (evaluate.py reuses it)."""
  return jax.random.key(seed + 1)


def split_index(
  batch_number: int,
  local_batch: int,
  process_index: int = 0,
  process_count: int = 1,
) -> np.ndarray:
  """Places in the whole split of an eval batch's examples: process p holds its every
  process_count-th example from p on (input_pipeline.load_dataset), padding past the end."""
  local = batch_number * local_batch + np.arange(local_batch)
  return (local * process_count + process_index).astype(np.int32)


def cross_entropy(logits, labels, smoothing: float):
  """Per-example softmax cross-entropy against label-smoothed one-hot targets."""
  targets = optax.smooth_labels(
    jax.nn.one_hot(labels, logits.shape[-1]), smoothing
  )
  return optax.softmax_cross_entropy(logits, targets)


def train_step(
  state, batch, rng, *, prepare_fn, mask, smoothing, axis_name=parallel.AXIS
):
  """(state, batch, rng) -> (state, metrics). Pure; gradients and statistics pmean'd."""
  # Keyed on the step, not on the device: prepare_fn keys each example on its place in
  # the global batch, so one device or several draw the same augmentation.
  rng = jax.random.fold_in(rng, state.step)
  images, labels, weights = prepare_fn(with_index(batch, axis_name), rng)
  # The mean over the real rows of the global batch (the epoch's last batch is padded,
  # with weight 0): each device divides its weighted sum by the mean real-row count per
  # device, so the pmean below of losses, gradients and metrics is sum(w * x) / sum(w).
  weights = weights / jax.lax.pmean(jnp.sum(weights), axis_name)

  def loss_fn(params):
    # Frozen leaves are constants to autodiff: no backward pass is built for them.
    params = jax.tree.map(
      lambda p, m: p if m == 'trainable' else jax.lax.stop_gradient(p),
      params,
      mask,
    )
    (logits, _), updates = state.apply_fn(
      {'params': params, 'batch_stats': state.batch_stats},
      images,
      train=True,
      mutable=['batch_stats'],
    )
    loss = jnp.sum(cross_entropy(logits, labels, smoothing) * weights)
    return loss, (logits, updates['batch_stats'])

  (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    state.params
  )
  grads = jax.lax.pmean(grads, axis_name)
  state = state.apply_gradients(
    grads=grads, batch_stats=jax.lax.pmean(stats, axis_name)
  )
  metrics = {
    'loss': loss,
    'accuracy': jnp.sum((jnp.argmax(logits, -1) == labels) * weights),
  }
  metrics = jax.lax.pmean(metrics, axis_name)
  # The step's real rows (over all devices): the epoch mean weighs each step by them.
  real = (
    batch['mask']
    if 'mask' in batch
    else jnp.ones(batch['image'].shape[0], jnp.float32)
  )
  metrics['count'] = jax.lax.psum(jnp.sum(real), axis_name)
  return state, metrics


def eval_step(
  state, batch, rng, *, prepare_fn, smoothing, axis_name=parallel.AXIS
):
  """Sums of loss and correct predictions over the real (unpadded) examples."""
  images, labels, weights = prepare_fn(with_index(batch, axis_name), rng)
  logits, _ = state.apply_fn(
    {'params': state.params, 'batch_stats': state.batch_stats},
    images,
    train=False,
  )
  sums = {
    'loss': jnp.sum(cross_entropy(logits, labels, smoothing) * weights),
    'correct': jnp.sum((jnp.argmax(logits, -1) == labels) * weights),
    'count': jnp.sum(weights),
  }
  return jax.lax.psum(sums, axis_name)


def compiled_train_step(
  config, mask, data_parallel, *, smoothing=None, prepare_fn=None, donate=True
):
  """train_step for `config` as one data-parallel program (data_parallel.DataParallel: jit
  over the mesh, or pmap): the one place a train step is built (train, the benchmarks and
  the tests call this). The state is donated: each step's output state replaces its
  input's buffers."""
  step = functools.partial(
    train_step,
    prepare_fn=prepare_fn or make_prepare_fn(config, train=True),
    mask=mask,
    smoothing=config.label_smoothing if smoothing is None else smoothing,
  )
  return data_parallel.compile(
    step, batch_args=(1,), donate=(0,) if donate else ()
  )


def compiled_eval_step(config, data_parallel, *, smoothing=None):
  """eval_step for `config` as one data-parallel program."""
  step = functools.partial(
    eval_step,
    prepare_fn=make_prepare_fn(config, train=False),
    smoothing=config.label_smoothing if smoothing is None else smoothing,
  )
  return data_parallel.compile(step, batch_args=(1,))
