"""A run's training state: the model's parameters (fresh, or a pretext's backbone), the freeze
mask, the optimiser, and frozen BatchNorm statistics re-estimated on the task's images."""

import copy
import functools
import logging
from typing import Any

import jax
from flax.training import train_state

from rotjax import batch_plans
from rotjax import bn_stats
from rotjax import checkpoint as checkpoint_lib
from rotjax import compute as compute_lib
from rotjax import freeze
from rotjax import model_factory
from rotjax import models
from rotjax import optim
from rotjax import steps

# freeze_bn values whose frozen BatchNorm normalises with (and keeps) its running statistics.
RUNNING_STATS = ('running', 'reestimated')


class TrainState(train_state.TrainState):
  batch_stats: Any


def create_train_state(
  config, num_classes: int, steps_per_epoch: int, compute=None
):
  """Fresh state (or init_from's backbone), the freeze mask, and the lr schedule.

  compute: the run's (compute.resolve, once per start); None resolves config.model for
  one device, for callers outside a run (tests, benchmarks)."""
  if compute is None:
    compute = compute_lib.resolve(config.model)
  probe = model_factory.build_model(config, num_classes, compute)
  variables = model_factory.init_variables(
    probe, jax.random.key(config.seed), config.data.image_size
  )
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  mask = freeze.trainable_mask(params, config.trainable)
  # freeze_bn='batch' (the reports' PyTorch: frozen layers in .train() mode) treats frozen
  # BatchNorm like any other in training; only 'running' and 'reestimated' tell the model
  # which subtrees normalise with their running statistics instead.
  running = (
    freeze.frozen_prefixes(params, config.trainable)
    if config.freeze_bn in RUNNING_STATS
    else ()
  )
  model = model_factory.build_model(
    config, num_classes, compute, frozen=running
  )
  init_info = {}
  if config.init_from:
    loaded = checkpoint_lib.load_variables(config.init_from)
    # Another stage's head answers another question (rotations, not classes) even where the
    # shapes agree: a 4-class dataset from an N = 4 pretext must not start from its head.
    reinit_head = loaded['config'].get('stage') != config.stage
    params, names, kept = checkpoint_lib.merge_params(
      params, loaded['params'], config.head, reinit_head=reinit_head
    )
    batch_stats, _, _ = checkpoint_lib.merge_params(
      batch_stats,
      loaded['batch_stats'],
      config.head,
      what='batch_stats',
      reinit_head=reinit_head,
    )
    logging.info(
      'init_from %s: loaded %d parameter arrays; re-initialised %s',
      loaded['path'],
      len(names),
      kept or 'nothing',
    )
    init_info = {
      'init_from': loaded['path'],
      'loaded': len(names),
      'reinitialised': kept,
      'init_from_source': checkpoint_lib.source_record(loaded, config.workdir),
    }
  tx, schedule = optim.create_optimizer(
    config.optim, mask, steps_per_epoch, config.num_epochs
  )
  # tx.init as one program: run eagerly it is a few hundred one-op programs (Adam's zeros
  # per leaf, masked), each compiled afresh in every process (2 s of a run's start).
  state = TrainState(
    step=0,
    apply_fn=model.apply,
    params=params,
    tx=tx,
    opt_state=jax.jit(tx.init)(params),
    batch_stats=batch_stats,
  )
  return state, mask, schedule, init_info


def reestimate_frozen_bn(config, state, dataset, data_parallel, compute=None):
  """(state, record): the frozen layers' BatchNorm running statistics replaced by those of
  the task's training images (bn_stats), for freeze_bn='reestimated'.

  The images are prepared as training prepares them (same augmentation, a key of its own):
  these layers normalise the training batches with the statistics, as a BatchNorm's running
  average would have come from them. The epoch's full global batches only (at least one), so
  padding repeats no image; a model without `frozen` runs every BatchNorm in batch mode, and
  synced whatever model.sync_bn: each layer's input is then normalised over the global batch,
  so the statistics do not depend on how many devices share it. `compute` as for
  create_train_state (its BatchNorm still leaves statistics over several devices to XLA).
  """
  prefixes = freeze.frozen_prefixes(state.params, config.trainable)
  synced = copy.deepcopy(config)
  synced.model.sync_bn = True
  if compute is None:
    compute = compute_lib.resolve(config.model)
  module = model_factory.build_model(
    synced, model_factory.num_outputs(config, dataset), compute
  )
  prepare = steps.make_prepare_fn(config, train=True)
  key = jax.random.key(config.seed + 2)  # eval_key is seed + 1

  def prepare_images(batch, batch_number):
    return prepare(
      steps.with_index(batch), jax.random.fold_in(key, batch_number)
    )[0]

  p_moments = data_parallel.compile(
    functools.partial(
      bn_stats.moments_step, module=module, prepare_fn=prepare_images
    ),
    batch_args=(1,),
  )
  local_batch = dataset.local_batch(config.batch_size)
  num_steps = max(1, dataset.size('train') // config.batch_size)
  batches = batch_plans.train_batches(
    dataset.train,
    local_batch,
    config.seed,
    0,
    dataset.shards,
    num_steps,
    first_index=dataset.process_index * local_batch,
  )
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  stats, record = bn_stats.reestimate(
    p_moments,
    variables,
    batches,
    lambda path: models.is_frozen(path, prefixes),
    data_parallel,
  )
  record = {
    **record,
    'images': num_steps * config.batch_size,
    'augmentation': 'train',
  }
  logging.info(
    'freeze_bn=reestimated: %d BatchNorm layers (%s .. %s) re-estimated on %d '
    'training images in %.1f s',
    record['layers'],
    record['first_layer'],
    record['last_layer'],
    record['images'],
    record['seconds'],
  )
  return state.replace(batch_stats=stats), record
