"""Command line: python -m rotjax.report STUDY_DIR -> results.csv, report.md and figures.

Rebuilt from the run files alone (study_run.json, metrics.jsonl, summary.json,
config.json, run_info.json); checkpoints are never opened.
"""

import os
from typing import NamedTuple

from absl import app

from rotjax import metrics
from rotjax import rundir
from rotjax.study import against_reports
from rotjax.study import plots
from rotjax.study import results
from rotjax.study import sweep
from rotjax.study import tables

DEFAULT_REFERENCE = {
  'model': 'resnet18',
  'num_rotations': 4,
  'label_smoothing': 0.1,
  'samples_per_class': 0,
  'freeze_bn': sweep.FREEZE_BN_DEFAULT,
}
TABLES = (
  ('model', 'Stage × model'),
  ('label_smoothing', 'Stage × label smoothing'),
  ('num_rotations', 'Stage × rotations'),
  ('freeze_bn', 'Stage × frozen-layer BatchNorm'),
)
TABLE_NOTES = {
  'freeze_bn': (
    'freeze_bn=batch: BatchNorm in the frozen layers normalises with batch statistics and keeps '
    "updating its running statistics, gamma and beta fixed (the reports' PyTorch: frozen layers "
    'in .train() mode). freeze_bn=running: it normalises with its running statistics and leaves '
    'them; from random init (stage 3) those are mean 0 and variance 1, so layers 1-3 run '
    'unnormalised. freeze_bn=reestimated: as running, with the running statistics first '
    "re-estimated on the task's training images (one no-gradient pass). Only the stages with "
    'frozen layers are shown.'
  ),
  'num_rotations': (
    'Stage 1 is N-way: chance is 25.0% at N = 4, 16.7% at N = 6 and 12.5% at N = 8, so '
    'pretext accuracies compare only against their own chance. With rotation.geometry=disc '
    '(the settings table says which geometry each pretext used) every N sees the same '
    'pixels: the same resampling, sub-pixel shifts and disc, no padding bars. What is left at '
    'N = 6 and 8 is the pixel grid turning with the content, which a network can read from '
    'the finest texture (docs/design.md); their pretext accuracies may include some '
    'of it, N = 4 none.'
  ),
}


def load_runs(study_dir: str) -> list[dict]:
  """results.csv rows, each with its metrics history, config and run_info attached."""
  runs = []
  for row in results.collect(study_dir):
    workdir = os.path.join(study_dir, row['workdir'])
    # Completed (rundir.complete): a setting its config.json lacks has the value it ran with.
    config = rundir.read_config(workdir)
    # How the run trained, not how the plan names it: a run finished before freeze_bn
    # existed sits in the folder that now means the default.
    freeze_bn = config.freeze_bn if config else row['freeze_bn']
    runs.append(
      {
        **row,
        'freeze_bn': freeze_bn,
        'history': metrics.read_metrics(workdir),
        'config': config.to_dict() if config else {},
        'run_info': rundir.read(workdir, rundir.RUN_INFO, {}),
        'environment': results.read_record(workdir).get('environment'),
      }
    )
  return runs


def completed(runs: list[dict]) -> list[dict]:
  """Runs that trained all their epochs (the only ones in the tables)."""
  return [
    r
    for r in runs
    if r['status'] in ('done', 'finished', 'unknown')
    and r.get('best_val_accuracy') is not None
  ]


def reference(study_dir: str) -> dict:
  """The setting the tables hold fixed: the first value of each axis in study.json."""
  manifest = rundir.read_json(os.path.join(study_dir, 'study.json'), {})
  return {**DEFAULT_REFERENCE, **manifest.get('reference', {})}


def _curve_figures(runs, ref, dataset, out_dir) -> list[str]:
  fixed = {k: v for k, v in ref.items() if k not in ('dataset', 'seed')}
  names = []
  for stage in sorted({r['stage'] for r in runs}):
    chosen = tables.select(runs, {**fixed, 'stage': stage})
    if not chosen:
      continue
    name = f'curves_{dataset}_{sweep.STAGES[stage][0]}.png'
    plots.learning_curves(
      [r['history'] for r in chosen],
      f'{dataset} {ref["model"]}, stage {tables.STAGE_LABELS[stage]}: '
      f'{len(chosen)} seed(s), band = min-max',
      os.path.join(out_dir, name),
    )
    names.append(name)
  return names


def dataset_section(
  runs, ref: dict, dataset: str, out_dir: str
) -> tuple[list[str], list[str]]:
  """Tables and figures of one dataset: (markdown lines, the PNG files written)."""
  runs = [r for r in runs if r['dataset'] == dataset]
  lines, figures = [f'## {dataset}', ''], []
  for axis, title in TABLES:
    cells = tables.stage_cells(runs, axis, ref)
    if not cells or (axis != 'model' and len(cells) < 2):
      continue  # Only tables with data (a sweep table needs two values of its axis).
    note = [TABLE_NOTES[axis], ''] if axis in TABLE_NOTES else []
    lines += (
      [
        f'### {title}',
        '',
        'Test accuracy (%) at the best-validation epoch, mean ± std over '
        'seeds; other axes at the reference setting.',
        '',
      ]
      + note
      + [tables.stage_table(cells, axis), '']
    )
    name = f'stages_{dataset}_{axis}.png'
    plots.stage_bars(
      {f'{axis}={v}': c for v, c in cells.items()},
      tables.SHORT_LABELS,
      f'{dataset}: {title.lower()} (mean ± std over seeds)',
      os.path.join(out_dir, name),
    )
    figures.append(name)
  curves = tables.labels_curves(runs, ref)
  first = next(iter(curves.values()))
  if len(first['counts']) >= 2:
    name = f'samples_per_class_{dataset}.png'
    found = plots.samples_per_class(
      curves,
      f'{dataset} {ref["model"]}: fine-tuned pretrained vs '
      'random init by labels per class (mean ± std over seeds)',
      os.path.join(out_dir, name),
    )
    figures.append(name)
    crossing = (
      ', '.join(f'{x:.0f}' for x in found['acc']) or 'none in this range'
    )
    lines += [
      '### Samples per class',
      '',
      'Best validation accuracy (%), minimum validation loss '
      'and test accuracy (%), mean ± std over seeds ("all" shows the images per class).',
      '',
      tables.labels_table(curves),
      '',
      f'Accuracy crossover (labels per class, interpolated in '
      f'log x): {crossing}.',
      '',
    ]
  figures += _curve_figures(runs, ref, dataset, out_dir)
  lines += ['### Figures', ''] + [f'![{n}]({n})' for n in figures] + ['']
  return lines, figures


class Built(NamedTuple):
  """What build_report wrote: report.md's path and its figures (names in the study folder)."""

  path: str
  figures: list


def build_report(study_dir: str) -> Built:
  """Writes results.csv, report.md and the PNGs into study_dir."""
  runs = load_runs(study_dir)
  results.write_csv(runs, os.path.join(study_dir, 'results.csv'))
  done, ref = completed(runs), reference(study_dir)
  counts = {}
  for r in runs:
    counts[r['status']] = counts.get(r['status'], 0) + 1
  lines = [
    '# Rotation pretext study',
    '',
    f'{len(runs)} runs: '
    + ', '.join(f'{n} {s}' for s, n in sorted(counts.items()))
    + '. Reference setting: '
    + ', '.join(
      f'{k}={v}' for k, v in ref.items() if k not in ('dataset', 'seed')
    )
    + '.',
    '',
  ]
  lines += against_reports.against_reports(done)
  figures = []
  for dataset in sorted({r['dataset'] for r in done}):
    section, written = dataset_section(done, ref, dataset, study_dir)
    lines += section
    figures += written
  if done:
    lines += [
      '## Settings',
      '',
      "From the runs' config.json and run_info.json.",
      '',
      tables.settings_table(done),
      '',
    ] + against_reports.machine_section(done)
  problems = [
    r for r in runs if r['status'] not in ('done', 'finished', 'unknown')
  ]
  if problems:
    lines += [
      '## Runs not finished',
      '',
      tables.markdown_table(
        ['run', 'status', 'error'],
        [[r['workdir'], r['status'], r['error'] or ''] for r in problems],
      ),
      '',
    ]
  path = os.path.join(study_dir, 'report.md')
  with open(path, 'w') as f:
    f.write('\n'.join(lines))
  return Built(path, figures)


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('usage: python -m rotjax.report STUDY_DIR')
  built = build_report(argv[1])
  print(
    f'wrote {built.path} and {len(built.figures)} figures beside it', flush=True
  )
