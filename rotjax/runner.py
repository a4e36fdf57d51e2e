"""Runs a study's plan: skip finished runs, resume interrupted ones, record failures, go on."""
import json
import logging
import os
import time
import traceback

from rotjax import input_pipeline
from rotjax import results
from rotjax import sweep
from rotjax import train

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


def is_finished(run_config) -> bool:
  """summary.json says the run trained all its epochs."""
  summary = results.read_json(os.path.join(run_config.workdir, 'summary.json'), {})
  return summary.get('epochs') == run_config.num_epochs


def write_manifest(config, runs, study_dir) -> None:
  """study.json: the study config, the reference setting, and every run with its pretext."""
  results.write_json(os.path.join(study_dir, MANIFEST), {
      'config': config.to_dict(),
      'reference': {a: config.axes[a][0] for a in sweep.AXES},
      'runs': [{'name': r.name, 'stage': r.stage, **r.axes(),
                'pretext_run': r.pretext.name if r.pretext else ''} for r in runs]})


def _train(run_config, datasets) -> tuple[str, str, dict]:
  """(status, error, summary) of one training; an exception becomes a 'failed' status."""
  try:
    # Looked up at call time, so a test can monkeypatch train.train_and_evaluate.
    summary = train.train_and_evaluate(run_config, dataset=datasets.get(run_config.data))
  except Exception as e:  # One bad run must not stop the study: record it and go on.
    logging.error('run %s failed:\n%s', run_config.workdir, traceback.format_exc())
    return 'failed', f'{type(e).__name__}: {e}', {}
  if summary.get('epochs') != run_config.num_epochs:
    return 'failed', f'stopped after {summary.get("epochs")} of {run_config.num_epochs} epochs', summary
  return 'done', '', summary


def _line(k, n, name, status, seconds, summary, error) -> str:
  detail = error
  if summary:
    detail = (f'best val {summary["best_val_accuracy"]:.4f}, '
              f'test {summary["test_accuracy"]:.4f}, {summary["epochs"]} epochs')
  return f'[{k}/{n}] {name}: {status} in {seconds:.0f}s' + (f' ({detail})' if detail else '')


def run_study(config, datasets=None) -> list[dict]:
  """Trains every run of the plan in order; returns the rows of results.csv."""
  study_dir = os.path.abspath(os.path.expanduser(config.workdir))
  if not config.workdir:
    raise ValueError('workdir is required: pass --config.workdir=PATH')
  runs = sweep.plan(config)
  write_manifest(config, runs, study_dir)
  datasets = datasets or DatasetCache()
  status, rows = {}, []
  for k, run in enumerate(runs, 1):
    run_config = sweep.run_config(config, run)
    record = {'name': run.name, 'stage': run.stage, **run.axes(),
              'pretext_run': run.pretext.name if run.pretext else ''}
    t0, summary, error = time.time(), {}, ''
    pretext_status = status.get(record['pretext_run'], ('finished', ''))
    if is_finished(run_config):
      state = 'finished'
    elif pretext_status[0] not in ('done', 'finished'):
      state, error = 'skipped', f'pretext {record["pretext_run"]} {pretext_status[0]}: {pretext_status[1]}'
    else:
      print(f'[{k}/{len(runs)}] {run.name}: training', flush=True)
      results.write_record(run_config.workdir, {**record, 'status': 'running', 'error': ''})
      state, error, summary = _train(run_config, datasets)
    status[run.name] = (state, error)
    results.write_record(run_config.workdir, {**record, 'status': state, 'error': error,
                                              'seconds': time.time() - t0})
    print(_line(k, len(runs), run.name, state, time.time() - t0, summary, error), flush=True)
    rows = results.collect(study_dir)
    results.write_csv(rows, os.path.join(study_dir, 'results.csv'))
  return rows
