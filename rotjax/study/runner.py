"""Runs a study's plan: skip finished runs, resume interrupted ones, record failures, go on."""

import json
import logging
import os
import time
import traceback

from rotjax import checkpoint
from rotjax import input_pipeline
from rotjax import rundir
from rotjax import train
from rotjax.study import environment
from rotjax.study import report
from rotjax.study import results
from rotjax.study import sweep

MANIFEST = 'study.json'


class DatasetCache:
  """Loads each data config once per process (samples_per_class changes the train split)."""

  def __init__(self, load_fn=input_pipeline.load_dataset):
    self.load_fn, self.loaded = load_fn, {}

  def get(self, data_config):
    key = json.dumps(data_config.to_dict(), sort_keys=True, default=str)
    if key not in self.loaded:
      self.loaded[key] = self.load_fn(data_config)
    return self.loaded[key]


# Settings that do not change what a run learns: where it lives and how it logs. init_from
# is a path (the study folder may move): what a run loaded is checked by source_change.
# data.source is a result setting: tfds:cifar10 and the JPEG folder copy differ in pixels.
# The data loader, its worker count and the checkpoints inside epochs give the same batches
# and numbers (tests/streaming_test.py), and data_dir is where tfds keeps data.source.
_NOT_RESULT_SETTINGS = (
  'workdir',
  'init_from',
  'progress',
  'log_every_steps',
  'keep_checkpoints',
  'distributed',
  'data.cache_dir',
  'compile_cache',
  'data.loader',
  'data.workers',
  'data.data_dir',
  'checkpoint_every_steps',
)


def _flatten(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[prefix + key] = list(value) if isinstance(value, tuple) else value
  return flat


def changed_settings(run_config) -> list[str]:
  """Settings in which the run already in the workdir (its config.json) differs from the plan.

  A run trained by an older rotjax or with other settings must not be reported under the
  plan's labels (e.g. a stage 3 from before freeze_bn, whose frozen BatchNorm used running
  statistics) nor be resumed as if it were the planned one. A setting missing from the old
  config.json has the value that release ran with (rundir.before_they_existed: model.norm's
  'auto', a kernel choice that moves results by rounding only, freeze_bn's 'running', ...),
  and counts as changed where there is none.
  """
  saved = rundir.read(run_config.workdir, rundir.CONFIG, {})
  if not saved:
    return []
  old, new = _flatten(saved), _flatten(run_config.to_dict())
  ignored = lambda key: any(
    key == k or key.startswith(k + '.') for k in _NOT_RESULT_SETTINGS
  )
  known = rundir.before_they_existed(saved)
  before = lambda key: old.get(key, known.get(key, '<missing>'))
  return sorted(k for k, v in new.items() if not ignored(k) and before(k) != v)


class SourceRecords:
  """What loading each pretext run would give now (checkpoint.source_record), read once."""

  def __init__(self):
    self.loaded = {}

  def get(self, source_dir: str, workdir: str) -> dict | None:
    """The record a run in `workdir` would write, loading `source_dir` now (None: nothing to load)."""
    if source_dir not in self.loaded:
      try:
        # Only the record is kept (relative to the source itself), not the arrays.
        self.loaded[source_dir] = checkpoint.source_record(
          checkpoint.load_variables(source_dir), source_dir
        )
      except FileNotFoundError:  # no such run, or no complete checkpoint in it
        self.loaded[source_dir] = None
    record = self.loaded[source_dir]
    if record is None:
      return None
    return {
      **record,
      'run': os.path.relpath(
        rundir.absolute(source_dir), rundir.absolute(workdir)
      ),
    }


def source_change(run_config, sources: SourceRecords) -> str:
  """Why the run already in the workdir did not start from its planned init_from as that
  run is now ('' if it did, or never started): another pretext (pretext_seed changed) or the
  same folder retrained. A run that records no source (an older rotjax) counts as changed."""
  info = rundir.read(run_config.workdir, rundir.RUN_INFO, {})
  if not info:
    return ''
  recorded = info.get('init_from_source')
  if recorded is None:
    return (
      f'{run_config.workdir} does not record which checkpoint it loaded (trained by an '
      'older rotjax): delete that folder to train it from the planned pretext'
    )
  now = sources.get(run_config.init_from, run_config.workdir)
  if recorded != now:
    now_text = (
      checkpoint.describe_source(now)
      if now
      else f'{run_config.init_from}: no checkpoint'
    )
    return (
      f'{run_config.workdir} was trained from {checkpoint.describe_source(recorded)}, '
      f'the planned pretext is {now_text}: delete that folder to train it from the '
      'planned pretext'
    )
  return ''


def is_finished(run_config) -> bool:
  """summary.json says the run trained all its epochs."""
  summary = rundir.read(run_config.workdir, rundir.SUMMARY, {})
  return summary.get('epochs') == run_config.num_epochs


def write_manifest(config, runs, study_dir) -> None:
  """study.json: the study config, the reference setting, and every run with its pretext."""
  rundir.write_json(
    os.path.join(study_dir, MANIFEST),
    {
      'config': config.to_dict(),
      'reference': {a: config.axes[a][0] for a in sweep.AXES},
      'runs': [
        {
          'name': r.name,
          'stage': r.stage,
          **r.axes(),
          'pretext_run': r.pretext.name if r.pretext else '',
        }
        for r in runs
      ],
    },
  )


def _train(run_config, datasets) -> tuple[str, str, dict]:
  """(status, error, summary) of one training; an exception becomes a 'failed' status."""
  try:
    # Looked up at call time, so a test can monkeypatch train.train_and_evaluate.
    summary = train.train_and_evaluate(
      run_config, dataset=datasets.get(run_config.data)
    )
  except (
    Exception
  ) as e:  # One bad run must not stop the study: record it and go on.
    logging.error(
      'run %s failed:\n%s', run_config.workdir, traceback.format_exc()
    )
    return 'failed', f'{type(e).__name__}: {e}', {}
  if summary.get('epochs') != run_config.num_epochs:
    return (
      'failed',
      f'stopped after {summary.get("epochs")} of {run_config.num_epochs} epochs',
      summary,
    )
  return 'done', '', summary


def write_report(study_dir: str) -> report.Built | None:
  """Rebuilds results.csv, report.md and its figures; None if that failed.

  Never raises: a plotting or table bug must not stop a study of many hours (the runs are what
  matter, and `python -m rotjax.report DIR` rebuilds the report once the bug is fixed).
  """
  try:
    # Looked up at call time, so a test can monkeypatch report.build_report.
    return report.build_report(study_dir)
  except (
    Exception
  ):  # Whatever broke, the study goes on; the traceback says what.
    logging.error(
      'report of %s failed (rebuild: python -m rotjax.report %s):\n%s',
      study_dir,
      study_dir,
      traceback.format_exc(),
    )
    return None


def _line(k, n, name, status, seconds, summary, error) -> str:
  detail = error
  if summary:
    detail = (
      f'best val {summary["best_val_accuracy"]:.4f}, '
      f'test {summary["test_accuracy"]:.4f}, {summary["epochs"]} epochs'
    )
  return f'[{k}/{n}] {name}: {status} in {seconds:.0f}s' + (
    f' ({detail})' if detail else ''
  )


def run_study(config, datasets=None) -> list[dict]:
  """Trains every run of the plan in order; returns the rows of results.csv.

  results.csv is rewritten after every run, and report.md with its figures after every run that
  trained, so an interrupted study has both up to date. Call write_report at the end for a report
  that also lists the runs this call only skipped or found finished (run_study_and_report does).
  """
  study_dir = rundir.absolute(config.workdir)
  if not config.workdir:
    raise ValueError('workdir is required: pass --config.workdir=PATH')
  runs = sweep.plan(config)
  write_manifest(config, runs, study_dir)
  datasets = datasets or DatasetCache()
  sources = SourceRecords()
  status, rows = {}, []
  for k, run in enumerate(runs, 1):
    run_config = sweep.run_config(config, run)
    record = {
      'name': run.name,
      'stage': run.stage,
      **run.axes(),
      'pretext_run': run.pretext.name if run.pretext else '',
    }
    t0, summary, error = time.time(), {}, ''
    pretext_status = status.get(record['pretext_run'], ('finished', ''))
    changed = changed_settings(run_config)
    if changed:
      state, error = (
        'stale',
        (
          f'{run_config.workdir} holds a run trained with other settings '
          f'({", ".join(changed[:6])}{", ..." if len(changed) > 6 else ""}): '
          'delete that folder to train it as planned'
        ),
      )
    elif pretext_status[0] not in ('done', 'finished'):
      # Results made from a pretext that is not the planned one are not the planned results.
      state = 'stale' if is_finished(run_config) else 'skipped'
      error = f'pretext {record["pretext_run"]} {pretext_status[0]}: {pretext_status[1]}'
    elif run.pretext and (change := source_change(run_config, sources)):
      state, error = 'stale', change
    elif is_finished(run_config):
      state = 'finished'
    else:
      print(f'[{k}/{len(runs)}] {run.name}: training', flush=True)
      before = results.read_record(run_config.workdir)
      # Where it trains, beside what it learns; a run resumed elsewhere keeps both.
      record['environment'] = environment.describe()
      if before.get('environment') not in (None, record['environment']):
        record['environment_before'] = before['environment']
      results.write_record(
        run_config.workdir, {**record, 'status': 'running', 'error': ''}
      )
      state, error, summary = _train(run_config, datasets)
    if 'environment' not in record and (
      old := results.read_record(run_config.workdir)
    ):
      record.update(
        {k: old[k] for k in ('environment', 'environment_before') if k in old}
      )
    status[run.name] = (state, error)
    results.write_record(
      run_config.workdir,
      {**record, 'status': state, 'error': error, 'seconds': time.time() - t0},
    )
    print(
      _line(k, len(runs), run.name, state, time.time() - t0, summary, error),
      flush=True,
    )
    rows = results.collect(study_dir)
    results.write_csv(rows, os.path.join(study_dir, 'results.csv'))
    if state in ('done', 'failed'):
      write_report(study_dir)
  return rows


def final_line(
  study_dir: str, rows: list[dict], built: report.Built | None
) -> str:
  """What the study did and which report files it wrote (or how to rebuild a failed report)."""
  counts = {}
  for row in rows:
    counts[row['status']] = counts.get(row['status'], 0) + 1
  line = (
    f'study {study_dir}: {len(rows)} runs ('
    + ', '.join(f'{n} {status}' for status, n in sorted(counts.items()))
    + ')'
  )
  if built is None:
    return f'{line}; the report failed (error above), rebuild: python -m rotjax.report {study_dir}'
  return (
    f'{line}; wrote {built.path} and {len(built.figures)} figures beside it: '
    f'{", ".join(built.figures)}'
  )


def run_study_and_report(config, datasets=None) -> str:
  """run_study, then the report once more; returns the line naming report.md and its figures."""
  rows = run_study(config, datasets)
  # Runs this call only skipped or found finished had no report build of their own.
  study_dir = rundir.absolute(config.workdir)
  return final_line(study_dir, rows, write_report(study_dir))
