"""A run's folder: what its files are called, how each is read and written, where its
checkpoints are, and the rule that its log never runs ahead of them. Everything else asks
this module; nothing else spells out a file name of a run.

  WORKDIR/config.json         the config as given (`model.dtype=auto` stays `auto`); read
                              back through `read_config`, settings added since filled in
  WORKDIR/run_info.json       what the first start resolved: devices, data sizes, compute
                              (dtype, convolutions), the checkpoint it loaded (init_from)
  WORKDIR/metrics.jsonl       one row per finished epoch, appended once that epoch's
                              checkpoint is committed (`commit_epoch`)
  WORKDIR/summary.json        written when the last epoch is done
  WORKDIR/checkpoints/<step>  the latest few Orbax steps: a rerun resumes from here (epoch
                              ends, and every checkpoint_every_steps steps inside an epoch)
  WORKDIR/best/<step>         the best on validation: what init_from and rotjax.load read
  WORKDIR/events.out.tfevents.*  TensorBoard scalars

Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so
a step folder named by its number alone is a whole checkpoint (`step_dirs`).
"""

import json
import os

CONFIG = 'config.json'
RUN_INFO = 'run_info.json'
METRICS = 'metrics.jsonl'
SUMMARY = 'summary.json'
LATEST = 'checkpoints'
BEST = 'best'


def absolute(workdir: str) -> str:
  """The workdir as an absolute path (`~` expanded): the one spelling every module uses."""
  return os.path.abspath(os.path.expanduser(workdir))


def path(workdir: str, name: str) -> str:
  """WORKDIR/name, for one of the names above."""
  return os.path.join(absolute(workdir), name)


def read_json(file: str, default=None):
  """The parsed file, or `default` where it is missing or torn (a killed writer)."""
  try:
    with open(file) as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return default


def write_json(file: str, obj) -> None:
  """Write-then-rename, so a killed process never leaves half a file."""
  os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
  tmp = file + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, default=str)
  os.replace(tmp, file)


def read(workdir: str, name: str, default=None):
  """One of the run's JSON files (CONFIG, RUN_INFO, SUMMARY), or `default`."""
  return read_json(path(workdir, name), default)


def write(workdir: str, name: str, obj) -> None:
  write_json(path(workdir, name), obj)


# ---------------------------------------------------------------- an old run's config


def before_they_existed(config: dict) -> dict:
  """{setting: what a run ran with before it existed} for settings added since a run's
  config.json may have been written: model.norm's `auto` (a kernel choice; run_info.json
  says where its BatchNorm ran), freeze_bn's 'running' (frozen BatchNorm used the running
  statistics), rotation.geometry: exact rot90 for N = 4, the disc for N = 6 and 8, and
  `parallel`: pmap (the only way before)."""
  num_rotations = config.get('rotation', {}).get('num_rotations', 4)
  return {
    'model.norm': 'auto',
    'freeze_bn': 'running',
    'rotation.geometry': 'square' if num_rotations == 4 else 'disc',
    'parallel': 'pmap',
  }


def complete(config: dict):
  """A config.json's dict as a ConfigDict holding every setting of configs/common.py: one
  it lacks gets the value its run ran with (before_they_existed), else today's default. The
  one place an old run's config is filled in, so readers access every setting plainly."""
  import ml_collections
  from configs import common

  filled = common.get_config().to_dict()
  for key, value in before_they_existed(config).items():
    *parents, leaf = key.split('.')
    node = filled
    for name in parents:
      node = node[name]
    node[leaf] = value
  return ml_collections.ConfigDict(_merged(filled, config))


def _merged(base: dict, over: dict) -> dict:
  out = dict(base)
  for key, value in over.items():
    both = isinstance(value, dict) and isinstance(out.get(key), dict)
    out[key] = _merged(out[key], value) if both else value
  return out


def read_config(workdir: str):
  """The run's config.json, completed (`complete`); None where it has none."""
  config = read(workdir, CONFIG)
  return None if config is None else complete(config)


def is_run(workdir: str) -> bool:
  """A rotjax run's folder: it has a config.json."""
  return os.path.exists(path(workdir, CONFIG))


def step_dirs(workdir: str, sub: str) -> list[str]:
  """The complete checkpoint steps under WORKDIR/sub (LATEST or BEST), oldest first."""
  directory = path(workdir, sub)
  if not os.path.isdir(directory):
    return []
  steps = sorted(int(name) for name in os.listdir(directory) if name.isdigit())
  return [os.path.join(directory, str(step)) for step in steps]


def find_checkpoint(where: str, what: str = 'path') -> tuple[str, str]:
  """(workdir, step folder) of a run's workdir (its best step, else its latest) or of a step
  folder WORKDIR/checkpoints/<step> or WORKDIR/best/<step>. Errors name `what` was given
  (e.g. 'init_from') and why it is no checkpoint."""
  where_abs = absolute(where)
  if not os.path.exists(where_abs):
    raise FileNotFoundError(f'{what}={where} does not exist')
  parent = os.path.dirname(where_abs)
  if os.path.basename(where_abs).isdigit() and os.path.basename(parent) in (
    LATEST,
    BEST,
  ):
    return os.path.dirname(parent), where_abs
  for sub in (BEST, LATEST):
    steps = step_dirs(where_abs, sub)
    if steps:
      return where_abs, steps[-1]
  if not is_run(where_abs):
    raise FileNotFoundError(
      f'{what}={where} is not a rotjax run: it has no {CONFIG} and no complete checkpoint '
      f'under {LATEST}/ or {BEST}/ (pass the workdir of a finished stage, or '
      f'WORKDIR/{LATEST}/<step>)'
    )
  raise FileNotFoundError(
    f'{what}={where} has no complete checkpoint under {BEST}/ or '
    f'{LATEST}/ (did the run finish its first epoch?)'
  )


# ---------------------------------------------------------------- the log and the checkpoints


def commit_epoch(
  checkpoints, log, step: int, state, is_best: bool, row: dict
) -> None:
  """Saves the epoch's checkpoint (its metrics row inside it) and only once it is committed
  appends the row to metrics.jsonl: the log never claims an epoch a rerun would redo."""
  checkpoints.save(step, state, is_best, row)
  log.write(row)


def save_partial_epoch(
  checkpoints,
  step: int,
  state,
  *,
  epoch: int,
  steps_done: int,
  steps_per_epoch: int,
  data: dict,
  step_metrics: list[dict],
) -> None:
  """A checkpoint inside an epoch (checkpoint_every_steps): the state after `steps_done` of
  its steps, with the data loader's state (its position, epoch and steps_done, and `data`:
  what fixes the epoch's batches) and the epoch's step metrics so far, so that a resumed run trains the epoch's
  remaining batches and writes the very metrics row an uninterrupted run would. No row
  goes to metrics.jsonl: the epoch is not finished."""
  checkpoints.save(
    step,
    state,
    False,
    partial_epoch={
      'epoch': epoch,
      'steps_done': steps_done,
      'steps_per_epoch': steps_per_epoch,
      'data': data,
      'step_metrics': [
        {k: float(v) for k, v in m.items()} for m in step_metrics
      ],
    },
  )


def step_of(state) -> int:
  """The state's step as an int, also where it is a global array of several processes
  (not fully addressable: read from this process's copy)."""
  step = state.step
  if not getattr(step, 'is_fully_addressable', True):
    step = step.addressable_data(0)
  return int(step)


def resume(
  checkpoints, log, state, steps_per_epoch: int, data: dict | None = None
):
  """(state, first epoch to train, metrics rows so far, partial epoch or None) of a run
  starting in its workdir.

  From the latest complete checkpoint, if any. metrics.jsonl is cut back to the epochs
  the checkpoints hold (a kill may have fallen after an append and before the next
  commit), and the checkpointed epoch's row is appended again where a kill fell between
  its commit and its append (the row travels inside the checkpoint). best/ gets the
  restored step again where a kill fell between the two saves. A checkpoint inside an
  epoch (save_partial_epoch) returns what it saved of that epoch; its data loader state
  must match `data` (what fixes the batches now).
  """
  restored = checkpoints.restore_latest(state)
  partial = checkpoints.latest_partial_epoch() if restored is not None else None
  if restored is not None:
    state = restored
    if partial is None:
      _check_epoch_length(
        checkpoints.latest_row(), steps_per_epoch, checkpoints.workdir
      )
    else:
      _check_partial_epoch(partial, steps_per_epoch, data, checkpoints.workdir)
  start_epoch = step_of(state) // max(steps_per_epoch, 1)
  log.truncate(start_epoch)
  history = log.read()
  if (
    start_epoch
    and partial is None
    and (not history or history[-1]['epoch'] < start_epoch)
  ):
    row = checkpoints.latest_row()
    if row is not None and row.get('epoch') == start_epoch:
      log.write(row)
      history.append(row)
  if (
    restored is not None
    and partial is None
    and history
    and max(history, key=lambda r: r['val_accuracy'])['epoch'] == start_epoch
  ):
    checkpoints.ensure_best(step_of(state), state)
  return state, start_epoch, history, partial


def _check_partial_epoch(
  partial: dict, steps_per_epoch: int, data: dict | None, workdir: str
) -> None:
  """A run resumed inside an epoch must draw that epoch's batches as its first start did."""
  if partial['steps_per_epoch'] != steps_per_epoch:
    raise ValueError(
      f'{workdir} was trained with {partial["steps_per_epoch"]} steps per epoch, this run has '
      f'{steps_per_epoch} (another batch_size or training set): resume with its settings or '
      'use a new workdir'
    )
  saved = {
    k: v for k, v in partial.get('data', {}).items() if k in (data or {})
  }
  changed = {k: (v, data[k]) for k, v in saved.items() if v != data[k]}
  if changed:
    what = ', '.join(
      f'{k} {old} then, {new} now' for k, (old, new) in changed.items()
    )
    raise ValueError(
      f'{workdir} stopped inside epoch {partial["epoch"]} with batches fixed by '
      f'{what}: the epoch would continue with other images; resume with its '
      'settings or use a new workdir'
    )


def _check_epoch_length(row, steps_per_epoch: int, workdir: str) -> None:
  """A resumed run keeps its steps per epoch: the epoch it resumes at, its data order and
  its learning-rate schedule are all counted in them."""
  if row and row['step'] != row['epoch'] * steps_per_epoch:
    raise ValueError(
      f'{workdir} was trained with {row["step"] // row["epoch"]} steps per epoch, this run '
      f'has {steps_per_epoch} (another batch_size or training set, or a rotjax that dropped '
      "each epoch's last partial batch): resume with its settings or use a new workdir"
    )
