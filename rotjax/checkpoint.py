"""Where checkpoints are written and read: Orbax managers in the run's workdir.

WORKDIR/checkpoints/<step> (the latest few: resume from here) and WORKDIR/best/<step>
(the best on validation: init_from and rotjax.load read it); rundir.py names them and
finds a run's checkpoint. Orbax writes each step to a temporary directory and renames it
on commit, so a run killed mid-write leaves no step that restore could mistake for a
whole one (the leftover `<step>.orbax-checkpoint-tmp-*` is ignored, then cleaned up).
Each latest step also carries its epoch's metrics row, so a run killed between the
commit and the metrics.jsonl append loses no row on resume (rundir.commit_epoch).
"""

import hashlib
import json
import logging
import os

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from rotjax import rundir


class CheckpointWriteError(OSError):
  """A step could not be written (disk full, permissions); earlier steps are untouched."""


class Checkpoints:
  """The run's two managers. Saves unreplicated state dicts."""

  def __init__(self, workdir: str, keep: int = 3):
    self.workdir = rundir.absolute(workdir)
    self.latest = _manager(rundir.path(workdir, rundir.LATEST), keep)
    self.best = _manager(rundir.path(workdir, rundir.BEST), 1)

  def save(
    self,
    step: int,
    state,
    is_best: bool,
    row: dict | None = None,
    partial_epoch: dict | None = None,
  ) -> None:
    """Writes `step` and returns once it is committed; an error names the step and path.

    `row` is a finished epoch's metrics row; `partial_epoch` is what a step inside an epoch
    carries instead (rundir.save_partial_epoch): where the data loader stands and the
    epoch's step metrics so far. Waiting (instead of overlapping the write with the next
    steps) is what lets the caller append the metrics row only for committed steps.
    """
    item = flax.serialization.to_state_dict(state)
    meta = {'metrics_row': row} if row is not None else None
    if partial_epoch is not None:
      meta = {'partial_epoch': partial_epoch}
    try:
      self.latest.save(
        step, args=ocp.args.StandardSave(item), custom_metadata=meta
      )
      if is_best:
        self.best.save(
          step, args=ocp.args.StandardSave(item), custom_metadata=meta
        )
      self.wait()
    except (
      Exception
    ) as e:  # Disk full reaches here as tensorstore's ValueError, not OSError.
      raise CheckpointWriteError(
        f'cannot write checkpoint step {step} under '
        f'{os.path.dirname(str(self.latest.directory))} ({type(e).__name__}: {e}); the '
        'earlier checkpoints are intact: free space or fix permissions and rerun'
      ) from e

  def ensure_best(self, step: int, state) -> None:
    """Writes `state` (the restored, best step) to best/ if a kill fell between the two saves."""
    if (self.best.latest_step() or -1) < step:
      logging.info(
        'best/ lacks step %d (interrupted save): writing it again', step
      )
      self.best.save(
        step,
        args=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
      )
      self.best.wait_until_finished()

  def has_steps(self) -> bool:
    """Whether a complete step exists: the run resumes rather than starts."""
    return self.latest.latest_step() is not None

  def latest_row(self) -> dict | None:
    """The metrics row saved with the latest step (None for checkpoints without one)."""
    step = self.latest.latest_step()
    if step is None:
      return None
    meta = self.latest.metadata(step).custom_metadata or {}
    return meta.get('metrics_row')

  def latest_partial_epoch(self) -> dict | None:
    """What the latest step saved of an unfinished epoch (None for an epoch's end)."""
    step = self.latest.latest_step()
    if step is None:
      return None
    return (self.latest.metadata(step).custom_metadata or {}).get(
      'partial_epoch'
    )

  def restore_latest(self, state):
    """`state` restored from the latest complete step, or None if there is none."""
    step = self.latest.latest_step()
    if step is None:
      return None
    target = jax.tree.map(
      ocp.utils.to_shape_dtype_struct, flax.serialization.to_state_dict(state)
    )
    restored = self.latest.restore(step, args=ocp.args.StandardRestore(target))
    return flax.serialization.from_state_dict(state, restored)

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def _manager(directory: str, keep: int) -> ocp.CheckpointManager:
  # Each manager gets its own barrier names: with several processes, two managers
  # saving at once otherwise meet in the same Orbax barrier and fail
  # ("Barrier ThreadSaveMultiHostValueHolder:set_value_start is already ongoing").
  return ocp.CheckpointManager(
    directory,
    options=ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=True,
      cleanup_tmp_directories=True,
      multiprocessing_options=ocp.options.MultiprocessingOptions(
        barrier_sync_key_prefix=os.path.basename(directory)
      ),
    ),
  )


def restore_variables(step_dir: str) -> dict:
  """{'params', 'batch_stats'} as host numpy arrays from one complete Orbax step folder."""
  directory, step = os.path.dirname(step_dir), int(os.path.basename(step_dir))
  # The handler named, so that item_metadata reads the saved tree (None without it).
  with ocp.CheckpointManager(
    directory, item_handlers=ocp.StandardCheckpointHandler()
  ) as manager:
    if step not in manager.all_steps():
      raise FileNotFoundError(
        f'{step_dir} is not a complete checkpoint (interrupted save?)'
      )
    # Onto this process's first device, whatever wrote it: a checkpoint of global arrays
    # (parallel=jit) records its mesh, which another machine may not have.
    target = _local_target(manager.item_metadata(step))
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
  return jax.device_get(
    {
      'params': restored['params'],
      'batch_stats': restored.get('batch_stats', {}),
    }
  )


def _local_target(metadata):
  """ShapeDtypeStructs on this process's first device for every array of a checkpoint's
  metadata tree."""
  metadata = getattr(metadata, 'tree', metadata)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  is_array = lambda m: hasattr(m, 'shape') and hasattr(m, 'dtype')
  return jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
    metadata,
    is_leaf=is_array,
  )


def load_variables(workdir: str) -> dict:
  """Another run's variables (its best checkpoint, else its latest), with where they came
  from: {'params', 'batch_stats', 'step', 'path', 'workdir', 'config'}."""
  workdir, step_dir = rundir.find_checkpoint(workdir, 'init_from')
  variables = restore_variables(step_dir)
  logging.info('init_from: loaded %s', step_dir)
  return {
    **variables,
    'step': int(os.path.basename(step_dir)),
    'path': step_dir,
    'workdir': workdir,
    'config': rundir.read(workdir, rundir.CONFIG, {}),
  }


def source_record(loaded: dict, workdir: str) -> dict:
  """What a run loaded through init_from (run_info.json's `init_from_source`): the source
  run's folder relative to this run's `workdir` (so a study folder can move), its step, and
  digests of its config.json and of the arrays loaded. Two records differ iff the run
  would start from another pretext, even one retrained in the same folder."""
  return {
    'run': os.path.relpath(loaded['workdir'], rundir.absolute(workdir)),
    'step': loaded['step'],
    'config_sha256': _sha256(
      json.dumps(loaded['config'], sort_keys=True).encode()
    ),
    'arrays_sha256': arrays_digest(
      {'params': loaded['params'], 'batch_stats': loaded['batch_stats']}
    ),
  }


def arrays_digest(tree) -> str:
  """SHA-256 over every array's name, dtype, shape and bytes, in name order."""
  digest = hashlib.sha256()
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')
  for name in sorted(flat):
    value = np.ascontiguousarray(np.asarray(flat[name]))
    digest.update(f'{name}:{value.dtype.str}:{value.shape}'.encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def describe_source(record: dict) -> str:
  """One line naming a source_record (for messages)."""
  return (
    f'{record["run"]} step {record["step"]} (config {record["config_sha256"][:12]}, '
    f'arrays {record["arrays_sha256"][:12]})'
  )


def merge_params(init, loaded, head=('fc',), what='params', reinit_head=False):
  """`init` with every leaf replaced by `loaded`'s, except head leaves whose shape differs
  (or every head leaf, with reinit_head).

  A head leaf of another shape (a 4-way rotation head into a 10-way classifier)
  keeps its fresh init; any other shape mismatch, missing leaf or loaded leaf
  that `init` lacks (a resnet34 into a resnet18) is an error naming the
  parameters. Returns (merged, names_loaded, names_kept_at_init).
  """
  init_flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(init), sep='/')
  loaded_flat = flax.traverse_util.flatten_dict(
    flax.core.unfreeze(loaded), sep='/'
  )
  extra = sorted(
    n for n in loaded_flat if n not in init_flat and not _under(n, head)
  )
  if extra:
    raise ValueError(
      f'init_from has {len(extra)} {what} arrays this model lacks, e.g. '
      f'{extra[:3]}: was it trained with the same model.name, model.stem and '
      'model.width?'
    )
  merged, kept = {}, []
  for name, value in init_flat.items():
    if _under(name, head) and (
      reinit_head
      or (name in loaded_flat and np.shape(loaded_flat[name]) != value.shape)
    ):
      merged[name] = value
      kept.append(name)
      continue
    if name not in loaded_flat:
      raise ValueError(
        f'init_from has no {what} {name!r}: was it trained with the same '
        'model.name, model.stem and model.width?'
      )
    source = np.asarray(loaded_flat[name])
    if source.shape != value.shape:
      raise ValueError(
        f'init_from {what} {name!r} has shape {source.shape}, '
        f'this model needs {value.shape}'
      )
    merged[name] = source.astype(value.dtype)
  loaded_names = [n for n in init_flat if n not in kept]
  return flax.traverse_util.unflatten_dict(merged, sep='/'), loaded_names, kept


def _under(name: str, prefixes) -> bool:
  return any(name == p or name.startswith(p + '/') for p in prefixes)
