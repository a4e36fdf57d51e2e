"""Training a stage: its state (fresh, or init_from's backbone) and the loop around the
steps (steps.py): data, evaluation, checkpoints, metrics, resume.

A run resumes from its latest checkpoint, inside an epoch too (checkpoint_every_steps),
and gives the numbers an unbroken run gives.
"""

import contextlib
import itertools
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rotjax import batch_plans
from rotjax import checkpoint as checkpoint_lib
from rotjax import compile_cache
from rotjax import compute as compute_lib
from rotjax import config_checks
from rotjax import data_parallel as data_parallel_lib
from rotjax import freeze
from rotjax import input_pipeline
from rotjax import metrics as metrics_lib
from rotjax import model_factory
from rotjax import parallel
from rotjax import progress
from rotjax import rundir
from rotjax import run_state
from rotjax import steps
from rotjax import stopping
from rotjax.cpu import onednn_errors


# ---------------------------------------------------------------- the loop


def evaluate(
  p_eval_step, state, dataset, split, batch_size, data_parallel, rng
):
  """Mean loss and accuracy over a whole split (each process feeds its part; psum joins them)."""
  totals = None
  local_batch = dataset.local_batch(batch_size)
  batches = batch_plans.eval_batches(
    getattr(dataset, split), local_batch, dataset.eval_steps(split, batch_size)
  )
  # Closed on an error or a signal too: a traceback that keeps this frame would keep a
  # streaming loader's workers waiting.
  with contextlib.closing(batches):
    for i, batch in enumerate(batches):
      # Random numbers (the pretext's sub-pixel shifts) keyed on each example's place in the
      # split: the same metrics on any number of devices and processes.
      batch['index'] = steps.split_index(
        i, local_batch, dataset.process_index, dataset.process_count
      )
      sums = p_eval_step(state, data_parallel.put_batch(batch), rng)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = data_parallel.get(totals)
  count = max(float(totals['count']), 1.0)
  return {
    'loss': float(totals['loss']) / count,
    'accuracy': float(totals['correct']) / count,
  }


@stopping.stops_on_signals
@onednn_errors.named_errors()
def train_and_evaluate(config: ml_collections.ConfigDict, dataset=None) -> dict:
  """Trains config.stage in config.workdir, resuming from its latest checkpoint; returns the summary."""
  config_checks.check_config(config)
  workdir = rundir.absolute(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  devices = parallel.select_devices(config.num_devices)
  num_devices = len(devices)
  dp = data_parallel_lib.DataParallel(config.parallel, devices)
  # The run's dtype and kernels, decided once (a resumed run keeps its first start's);
  # config.json keeps what was asked for (model.dtype=auto stays auto).
  first_compute = _first_compute(workdir)
  compute = compute_lib.resolve(config.model, num_devices, first_compute)
  config_checks.check_model(config, compute)
  # Before the first compile: stages 2 and 3 (4 and 5, every seed, every resume) then
  # load the programs an earlier process compiled.
  compile_cache.enable(config.compile_cache)
  num_shards = input_pipeline.num_data_shards(config.data, jax.process_count())
  config_checks.check_batch(config, num_devices, num_shards)
  dataset = dataset or input_pipeline.load_dataset(
    config.data, jax.process_index(), jax.process_count()
  )
  config_checks.check_dataset(config, dataset)
  data_loaded = time.time()
  steps_per_epoch = dataset.steps_per_epoch(config.batch_size)
  num_classes = model_factory.num_outputs(config, dataset)
  ckpt = checkpoint_lib.Checkpoints(workdir, config.keep_checkpoints)
  with compile_cache.logged('model init'):
    state, mask, schedule, init_info = run_state.create_train_state(
      config, num_classes, steps_per_epoch, compute
    )
  if ckpt.has_steps():
    _check_same_source(workdir, init_info)
  trainable, total = freeze.count(state.params, mask)
  logging.info(
    '%s: %s, %d/%d parameters trainable, %d devices, %d train / %d val / %d test images',
    config.stage,
    config.model.name,
    trainable,
    total,
    num_devices,
    dataset.size('train'),
    dataset.size('val'),
    dataset.size('test'),
  )
  log = metrics_lib.MetricsLog(workdir, enabled=jax.process_index() == 0)
  # What fixes the training batches (batch_plans.TrainPlan): a run resumed inside an
  # epoch must have the same, so that it continues that epoch's very batches.
  data_state = {
    'seed': config.seed,
    'num_shards': dataset.num_shards,
    'train_images': dataset.size('train'),
    'batch_size': config.batch_size,
  }
  # Under jit the checkpoint comes back as global arrays on the mesh.
  state, start_epoch, history, partial = rundir.resume(
    ckpt, log, dp.restore_target(state), steps_per_epoch, data_state
  )
  if rundir.step_of(state):
    logging.info(
      'resuming %s from step %d%s',
      workdir,
      rundir.step_of(state),
      f' (step {partial["steps_done"]} of epoch {partial["epoch"]})'
      if partial
      else '',
    )
  best_val = max((r['val_accuracy'] for r in history), default=-1.0)
  if config.freeze_bn == 'reestimated':
    # Once, before the first step: a resumed run's checkpoint already holds the statistics
    # (the frozen layers leave them as they are), and its first start's record stays.
    if not rundir.step_of(state):
      with compile_cache.logged('BatchNorm re-estimation'):
        state, record = run_state.reestimate_frozen_bn(
          config, state, dataset, dp, compute
        )
    else:
      record = rundir.read(workdir, rundir.RUN_INFO, {}).get('bn_reestimated')
    init_info = {**init_info, 'bn_reestimated': record}
  compute_record = compute.record()
  logging.info('%s', compute_lib.summary_line(compute_record))
  logging.info('data parallel: %s', dp.describe())
  _write_run_info(
    workdir,
    config,
    dataset,
    init_info,
    num_devices,
    trainable,
    total,
    first_compute or compute_record,
    compute_record,
    dp,
  )

  state = dp.put(state)
  p_train_step = compile_cache.log_first_call(
    steps.compiled_train_step(config, mask, dp),
    'train step',
    since=data_loaded,
  )
  p_eval_step = compile_cache.log_first_call(
    steps.compiled_eval_step(config, dp), 'eval step'
  )
  rng = dp.put(jax.random.key(config.seed))
  eval_rng = dp.put(steps.eval_key(config.seed))
  images_per_step = config.batch_size * (
    config.rotation.num_rotations
    if config.stage == 'pretext' and config.rotation.mode == 'all'
    else 1
  )

  def save_partial(step, state, *, epoch, steps_done, step_metrics):
    rundir.save_partial_epoch(
      ckpt,
      step,
      dp.to_save(state),
      epoch=epoch,
      steps_done=steps_done,
      steps_per_epoch=steps_per_epoch,
      data={**data_state, 'loader': dataset.loader},
      step_metrics=step_metrics,
    )

  local_batch = dataset.local_batch(config.batch_size)
  # A run resumed inside an epoch: that epoch's remaining batches, its step metrics so far.
  resumed_step = partial['steps_done'] if partial else 0
  # Every remaining training batch as one stream (a streaming loader keeps its workers).
  # Processes feed the devices in process order: this one's rows start at p * local_batch.
  train_stream = batch_plans.epochs_of_batches(
    dataset.train,
    local_batch,
    config.seed,
    range(start_epoch + 1, config.num_epochs + 1),
    dataset.shards,
    steps_per_epoch,
    first_index=dataset.process_index * local_batch,
    first_step=resumed_step,
  )
  try:
    for epoch in range(start_epoch + 1, config.num_epochs + 1):
      t0 = time.time()
      first_step = resumed_step if epoch == start_epoch + 1 else 0
      batches = itertools.islice(train_stream, steps_per_epoch - first_step)
      batches = dp.prefetch(batches, 2)
      bar = progress.EpochBar(
        epoch,
        config.num_epochs,
        steps_per_epoch,
        images_per_step,
        enabled=config.progress and jax.process_index() == 0,
      )
      state, step_metrics = train_steps(
        p_train_step,
        state,
        batches,
        rng,
        epoch=epoch,
        first_step=first_step,
        steps_per_epoch=steps_per_epoch,
        log_every=config.log_every_steps,
        bar=bar,
        save_every=config.checkpoint_every_steps,
        save_partial=save_partial,
        step_metrics=partial['step_metrics'] if first_step else (),
        fetch=dp.get,
      )
      train_time = time.time() - t0
      val = evaluate(
        p_eval_step,
        state,
        dataset,
        'val',
        config.eval_batch_size,
        dp,
        eval_rng,
      )
      test = evaluate(
        p_eval_step,
        state,
        dataset,
        'test',
        config.eval_batch_size,
        dp,
        eval_rng,
      )
      row = {
        'epoch': epoch,
        'step': epoch * steps_per_epoch,
        'learning_rate': float(schedule(epoch * steps_per_epoch - 1)),
        **metrics_lib.epoch_means(step_metrics),
        'val_loss': val['loss'],
        'val_accuracy': val['accuracy'],
        'test_loss': test['loss'],
        'test_accuracy': test['accuracy'],
        'train_seconds': train_time,
        'epoch_seconds': time.time() - t0,
        'images_per_second': steps_per_epoch
        * images_per_step
        / max(train_time, 1e-9),
        # Each epoch's own: an explicit override on resume may differ from run_info's.
        'dtype': compute.dtype,
        'conv': compute.conv,
        'norm': compute.norm,
      }
      is_best = val['accuracy'] > best_val
      best_val = max(best_val, val['accuracy'])
      rundir.commit_epoch(
        ckpt,
        log,
        epoch * steps_per_epoch,
        dp.to_save(state),
        is_best,
        row,
      )
      history.append(row)
      bar.close(row)
  finally:
    train_stream.close()  # stops a streaming loader's workers, on errors too
  ckpt.wait()
  ckpt.close()
  log.close()
  summary = metrics_lib.summarize(history)
  if jax.process_index() == 0:
    rundir.write(workdir, rundir.SUMMARY, summary)
  return summary


def train_steps(
  p_train_step,
  state,
  batches,
  rng,
  *,
  epoch: int,
  first_step: int,
  steps_per_epoch: int,
  log_every: int,
  bar,
  save_every: int = 0,
  save_partial=None,
  step_metrics=(),
  fetch=jax.device_get,
):
  """(state, the epoch's step metrics): a train step per batch, from step first_step + 1
  of `epoch` on; `step_metrics` are those of its steps before (a run resumed inside it).

  Metrics stay on the devices between host syncs: every log_every steps, at the epoch's
  end and before a checkpoint inside it (every save_every global steps: `save_partial`),
  the pending ones are fetched at once (`fetch`: the DataParallel's get), checked and
  shown.
  """
  step_metrics = list(step_metrics)
  pending = []
  for step_in_epoch, batch in enumerate(batches, first_step + 1):
    state, metrics = p_train_step(state, batch, rng)
    pending.append(metrics)
    step = (epoch - 1) * steps_per_epoch + step_in_epoch
    save_now = (
      save_every and step % save_every == 0 and step_in_epoch < steps_per_epoch
    )
    if (
      step_in_epoch % log_every == 0
      or step_in_epoch == steps_per_epoch
      or save_now
    ):
      # The one host sync: fetch the metrics of the last few steps at once.
      fetched = fetch(pending)
      pending = []
      step_metrics += fetched
      _check_finite(fetched, epoch, step)
      bar.update(step_in_epoch, fetched[-1])
    if save_now:
      save_partial(
        step,
        state,
        epoch=epoch,
        steps_done=step_in_epoch,
        step_metrics=step_metrics,
      )
  return state, step_metrics


def _check_finite(fetched, epoch, step):
  for m in fetched:
    if not np.isfinite(m['loss']):
      raise FloatingPointError(
        f'non-finite loss {m["loss"]} at epoch {epoch}, step <= {step}; the last '
        'checkpoint is intact: lower optim.learning_rate and rerun to resume from it'
      )


def _first_compute(workdir: str) -> dict | None:
  """run_info.json's `compute` where the run resumes (it has a complete checkpoint): what its
  first start resolved. None on a first start, or for a run from before it was recorded."""
  if not rundir.step_dirs(workdir, rundir.LATEST):
    return None
  return rundir.read(workdir, rundir.RUN_INFO, {}).get('compute')


def _check_same_source(workdir: str, init_info: dict) -> None:
  """A resumed run must load what its first start loaded: init_from retrained or replaced
  in between would make its epochs come from two different pretexts."""
  recorded = rundir.read(workdir, rundir.RUN_INFO, {}).get('init_from_source')
  now = init_info.get('init_from_source')
  if recorded and recorded != now:
    now_text = (
      checkpoint_lib.describe_source(now)
      if now
      else 'nothing (init_from is empty)'
    )
    raise ValueError(
      f'{workdir} started from {checkpoint_lib.describe_source(recorded)} and init_from now '
      f'holds {now_text}: its epochs would come from two different sources; delete the '
      'folder (or use another workdir) to train it from the current one'
    )


def _write_run_info(
  workdir,
  config,
  dataset,
  init_info,
  num_devices,
  trainable,
  total,
  compute,
  compute_now,
  dp,
):
  """config.json and run_info.json; `compute` is the first start's (the run's), `compute_now`
  this start's (they differ only by an explicit override, recorded in the metrics rows)."""
  if jax.process_index() != 0:
    return
  rundir.write(workdir, rundir.CONFIG, config.to_dict())
  rundir.write(
    workdir,
    rundir.RUN_INFO,
    {
      'stage': config.stage,
      'num_devices': num_devices,
      'parallel': dp.mode,
      'class_names': dataset.class_names,
      'train_images': dataset.size('train'),
      'val_images': dataset.size('val'),
      'test_images': dataset.size('test'),
      'data_shards': dataset.num_shards,
      'data_loader': {'loader': dataset.loader, 'why': dataset.loader_reason},
      'trainable_parameters': trainable,
      'total_parameters': total,
      'compute': compute,
      'compile_cache': compile_cache.status(),
      **({'compute_now': compute_now} if compute_now != compute else {}),
      **init_info,
    },
  )
