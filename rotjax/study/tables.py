"""The study report's tables: runs selected by their axes, cells of mean ± std over seeds, and
the markdown they are written as (report.py assembles them into report.md)."""

import re

import numpy as np

from rotjax import optim
from rotjax.study import sweep

STAGE_LABELS = {
  1: '1 rotation pretext',
  2: '2 fine-tune pretrained (layer4+fc)',
  3: '3 fine-tune random init (layer4+fc)',
  4: '4 supervised from pretrained',
  5: '5 supervised from random init',
}


SHORT_LABELS = {
  1: '1 pretext\n(rotation)',
  2: '2 fine-tune\npretrained',
  3: '3 fine-tune\nrandom init',
  4: '4 supervised\npretrained',
  5: '5 supervised\nrandom init',
}


def depends_on(axis: str, stage: int) -> bool:
  """Whether a stage's results can depend on the axis (freeze_bn: only with frozen layers)."""
  return axis != 'freeze_bn' or sweep.has_frozen_layers(stage)


def select(runs, fixed: dict) -> list[dict]:
  """Runs whose fields equal every value in fixed (any value of an axis the run ignores)."""
  return [
    r
    for r in runs
    if all(r[k] == v or not depends_on(k, r['stage']) for k, v in fixed.items())
  ]


def mean_std(values) -> tuple[float, float, int]:
  """Mean, sample std (0 for one value) and count, ignoring missing values."""
  values = np.asarray([v for v in values if v is not None], float)
  if not len(values):
    return float('nan'), 0.0, 0
  return (
    float(values.mean()),
    float(values.std(ddof=1)) if len(values) > 1 else 0.0,
    len(values),
  )


def fmt(cell, scale=100.0, digits=1) -> str:
  """'mean ± std (n=N)', scaled (accuracies to %); no std from one run; '-' for no runs."""
  mean, std, n = cell
  if not n:
    return '-'
  if n == 1:
    return f'{mean * scale:.{digits}f} (n=1)'
  return f'{mean * scale:.{digits}f} ± {std * scale:.{digits}f} (n={n})'


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
  """A GitHub-flavoured markdown table."""
  lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
  return '\n'.join(
    lines + ['| ' + ' | '.join(map(str, row)) + ' |' for row in rows]
  )


def stage_cells(runs, axis: str, ref: dict) -> dict:
  """cells[axis value][stage] = mean/std/n of test accuracy, other axes at the reference."""
  fixed = {k: v for k, v in ref.items() if k not in (axis, 'dataset', 'seed')}
  runs = [r for r in select(runs, fixed) if depends_on(axis, r['stage'])]
  cells = {}
  for value in sorted({r[axis] for r in runs}, key=_order_key):
    chosen = [r for r in runs if r[axis] == value]
    cells[value] = {
      s: mean_std(r['test_accuracy'] for r in chosen if r['stage'] == s)
      for s in sorted({r['stage'] for r in chosen})
    }
  return cells


def _order_key(value):
  # Numbers sort numerically; strings after them.
  return (isinstance(value, str), value)


def stage_table(cells: dict, axis: str) -> str:
  """Rows = stages, columns = values of the swept axis."""
  stages = sorted({s for by_stage in cells.values() for s in by_stage})
  header = ['stage'] + [f'{axis}={v}' for v in cells]
  rows = [
    [STAGE_LABELS[s]] + [fmt(cells[v].get(s, (0, 0, 0))) for v in cells]
    for s in stages
  ]
  return markdown_table(header, rows)


def per_class_x(run: dict) -> float:
  """Labels per class of a run; 'all' is the train split size over the class count."""
  if run['samples_per_class']:
    return float(run['samples_per_class'])
  info = run['run_info']
  return info.get('train_images', 0) / max(len(info.get('class_names', ())), 1)


def labels_curves(runs, ref: dict) -> dict:
  """Stage 2 vs stage 5 against labels per class, on the label counts both have."""
  fixed = {
    k: v
    for k, v in ref.items()
    if k not in ('samples_per_class', 'dataset', 'seed')
  }
  chosen = select(runs, fixed)
  counts = sorted(
    set.intersection(
      *[
        {r['samples_per_class'] for r in chosen if r['stage'] == s}
        for s in (2, 5)
      ]
    ),
    key=lambda c: (c == 0, c),
  )
  curves = {}
  for stage in (2, 5):
    by_count = [
      [r for r in chosen if r['stage'] == stage and r['samples_per_class'] == c]
      for c in counts
    ]
    x = [float(np.mean([per_class_x(r) for r in rs])) for rs in by_count]
    curves[STAGE_LABELS[stage]] = {
      'counts': counts,
      'x': x,
      'xlabels': [
        str(c) if c else f'all\n({v:.0f})' for c, v in zip(counts, x)
      ],
      'acc': tuple(
        zip(
          *[mean_std(r['best_val_accuracy'] for r in rs)[:2] for rs in by_count]
        )
      ),
      'loss': tuple(
        zip(*[mean_std(r['min_val_loss'] for r in rs)[:2] for rs in by_count])
      ),
      'test': [mean_std(r['test_accuracy'] for r in rs) for rs in by_count],
      'cells': [
        (
          mean_std(r['best_val_accuracy'] for r in rs),
          mean_std(r['min_val_loss'] for r in rs),
        )
        for rs in by_count
      ],
    }
  return curves


def labels_table(curves: dict) -> str:
  """Rows = labels per class; val acc, val loss and test acc of each compared stage."""
  first = next(iter(curves.values()))
  header = ['labels per class']
  for label in curves:
    header += [f'{label}: best val acc', 'min val loss', 'test acc']
  rows = []
  for i, count in enumerate(first['counts']):
    row = [
      f'{count or "all"} ({first["x"][i]:.0f})' if not count else str(count)
    ]
    for c in curves.values():
      (acc, loss), test = c['cells'][i], c['test'][i]
      row += [fmt(acc), fmt(loss, scale=1, digits=3), fmt(test)]
    rows.append(row)
  return markdown_table(header, rows)


def values_of(runs, get) -> str:
  values = sorted(
    {get(r) for r in runs if get(r) not in (None, '')}, key=_order_key
  )
  return ', '.join(map(str, values)) or '-'


def _pretext_seed(run: dict):
  match = re.search(r'-seed(\d+)', run.get('pretext_run') or '')
  return int(match.group(1)) if match else None


def _dtypes(run: dict) -> str | None:
  """'bfloat16', or e.g. 'bfloat16+float32' for a run whose epochs differ."""
  per_epoch = [r['dtype'] for r in run['history'] if r.get('dtype')]
  if per_epoch:
    return '+'.join(dict.fromkeys(per_epoch))
  return run['run_info'].get('compute', {}).get('dtype') or run['config'].get(
    'model', {}
  ).get('dtype')


def settings_table(runs) -> str:
  """What the runs used, from their config.json and run_info.json."""
  columns = (
    ('epochs', lambda r: r['config'].get('num_epochs')),
    ('model width', lambda r: r['config'].get('model', {}).get('width')),
    # What the run computed in: each epoch's (metrics rows, where an explicit override on
    # resume shows), else what `auto` resolved to at its start (run_info.json).
    ('dtype', _dtypes),
    ('convolutions', lambda r: r['run_info'].get('compute', {}).get('conv')),
    # Runs from before model.norm recorded none: their BatchNorm ran on XLA.
    (
      'BatchNorm',
      lambda r: (
        r['run_info'].get('compute', {}).get('norm', 'xla')
        if r['run_info'].get('compute')
        else None
      ),
    ),
    ('image size', lambda r: r['config'].get('data', {}).get('image_size')),
    ('batch', lambda r: r['config'].get('batch_size')),
    (
      'optimizer',
      lambda r: (
        '{name} lr {learning_rate:g}, '.format(**r['config']['optim'])
        + optim.schedule_name(r['config']['optim'])
        if r['config'].get('optim')
        else None
      ),
    ),
    ('trainable', lambda r: '+'.join(r['config'].get('trainable', ()))),
    # How the pretext rotates (rotation.geometry: 'disc', or the reports' 'square' rot90).
    (
      'rotation',
      lambda r: (
        '{num_rotations} x {geometry}'.format(**r['config']['rotation'])
        if r['stage'] == 1 and r['config']
        else None
      ),
    ),
    ('train images', lambda r: r['run_info'].get('train_images')),
    ('val images', lambda r: r['run_info'].get('val_images')),
    ('test images', lambda r: r['run_info'].get('test_images')),
    ('devices', lambda r: r['run_info'].get('num_devices')),
    ('seeds', lambda r: r['seed']),
    # Which pretext the pretrained stages loaded: one per seed, or one shared by all.
    ('pretext seed', _pretext_seed),
  )
  rows = []
  for stage in sorted({r['stage'] for r in runs}):
    chosen = [r for r in runs if r['stage'] == stage]
    rows.append(
      [STAGE_LABELS[stage]] + [values_of(chosen, get) for _, get in columns]
    )
  return markdown_table(['stage'] + [name for name, _ in columns], rows)
