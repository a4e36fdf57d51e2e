"""Per-run records of a study (study_run.json beside each run's metrics) and results.csv.

Reads only the files a run writes next to its checkpoints: study_run.json,
summary.json, config.json and run_info.json; never the checkpoints.
"""

import csv
import glob
import os

from rotjax import rundir

RECORD = 'study_run.json'
COLUMNS = (
  'stage',
  'dataset',
  'model',
  'num_rotations',
  'label_smoothing',
  'samples_per_class',
  'seed',
  'freeze_bn',
  'epochs',
  'best_val_accuracy',
  'test_accuracy',
  'min_val_loss',
  'wall_seconds',
  'images_per_second',
  'workdir',
  'pretext_run',
  'status',
  'error',
)


def write_record(workdir: str, record: dict) -> None:
  """study_run.json: a run's axes, pretext run, status and error."""
  rundir.write(workdir, RECORD, record)


def read_record(workdir: str) -> dict:
  """study_run.json of a run ({} where there is none)."""
  return rundir.read(workdir, RECORD, {})


def run_dirs(study_dir: str) -> list[str]:
  """Every run folder of a study (one with a record, or at least a config.json)."""
  found = set()
  for name in (RECORD, rundir.CONFIG):
    found |= {
      os.path.dirname(p)
      for p in glob.glob(os.path.join(study_dir, '*', '*', name))
    }
  return sorted(found)


def _from_config(workdir: str) -> dict:
  """The record of a run the study did not write (e.g. copied in): its axes from config.json."""
  config = rundir.read_config(workdir)  # a run from before freeze_bn: 'running'
  if config is None:
    return {}
  pretrained = bool(config.init_from)
  stage = {
    'pretext': 1,
    'finetune': 3 - pretrained,
    'supervised': 5 - pretrained,
  }[config.stage]
  return {
    'stage': stage,
    'dataset': config.data.dataset,
    'model': config.model.name,
    'num_rotations': config.rotation.num_rotations,
    'label_smoothing': config.label_smoothing,
    'samples_per_class': config.data.samples_per_class,
    'seed': config.seed,
    'freeze_bn': config.freeze_bn,
    'pretext_run': config.init_from,
    'status': 'unknown',
    'error': '',
  }


def collect(study_dir: str) -> list[dict]:
  """One row per run: its axes, status and summary (missing numbers are None)."""
  rows = []
  for workdir in run_dirs(study_dir):
    record = rundir.read(workdir, RECORD) or _from_config(workdir)
    if not record:
      continue
    summary = rundir.read(workdir, rundir.SUMMARY, {})
    row = {c: record.get(c, summary.get(c)) for c in COLUMNS}
    row['workdir'] = os.path.relpath(workdir, study_dir)
    if record.get('status') == 'unknown' and summary:
      row['status'] = 'finished'
    rows.append(row)
  return sorted(rows, key=lambda r: (r['stage'], r['workdir']))


def write_csv(rows: list[dict], path: str) -> None:
  """results.csv with COLUMNS; missing values are empty cells."""
  tmp = path + '.tmp'
  with open(tmp, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction='ignore')
    writer.writeheader()
    for row in rows:
      writer.writerow(
        {k: ('' if row.get(k) is None else row[k]) for k in COLUMNS}
      )
  os.replace(tmp, path)


def read_csv(path: str) -> list[dict]:
  """results.csv rows as dicts of strings."""
  with open(path, newline='') as f:
    return list(csv.DictReader(f))
