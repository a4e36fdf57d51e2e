"""The study report's comparison with the reports it reproduces, and where its runs trained."""

import numpy as np

from rotjax.study import environment
from rotjax.study import tables

# The reports' cells rotjax reproduces: CIFAR-10 test accuracy (%), ResNet18, 4 rotations,
# label smoothing 0.1, all labels (../shared/reference: reports 000 and 002, the
# numbers to beat), and the setting a run must have to stand beside them.
REPORTED = {1: 79.07, 2: 60.00, 3: 44.90, 4: 84.74, 5: 83.42}


REPORTED_SETTING = {
  'dataset': 'cifar10',
  'model': 'resnet18',
  'num_rotations': 4,
  'label_smoothing': 0.1,
  'samples_per_class': 0,
  'freeze_bn': 'batch',
}


def _epoch_gain(history: list[dict]) -> float | None:
  """Validation accuracy gained per epoch over the last two epochs (points of %)."""
  accs = [
    h['val_accuracy'] for h in history if h.get('val_accuracy') is not None
  ]
  if len(accs) < 2:
    return None
  recent = accs[-3:]
  return 100 * (recent[-1] - recent[0]) / (len(recent) - 1)


def _more_epochs(short: float, gain: float | None, epoch_seconds: float) -> str:
  """Epochs (and time) a linear continuation of the last epochs' gain needs to close `short`."""
  if short <= 0:
    return '-'
  if not gain or gain <= 0:
    return 'flat: more epochs alone do not close it'
  epochs = int(np.ceil(short / gain))
  return f'>= {epochs} ({epochs * epoch_seconds / 60:.0f} min)'


def against_reports(runs) -> list[str]:
  """Each stage at the reports' setting beside the reports' cell, with time and curve slope."""
  chosen = tables.select(runs, REPORTED_SETTING)
  if not chosen:
    return []
  rows, tests = [], {}
  for stage in sorted({r['stage'] for r in chosen}):
    stage_runs = [r for r in chosen if r['stage'] == stage]
    test = tables.mean_std(r['test_accuracy'] for r in stage_runs)
    tests[stage] = test[0] * 100
    epoch_seconds = float(
      np.mean(
        [
          h['epoch_seconds']
          for r in stage_runs
          for h in r['history']
          if h.get('epoch_seconds')
        ]
        or [0]
      )
    )
    gain = np.mean(
      [g for r in stage_runs if (g := _epoch_gain(r['history'])) is not None]
      or [np.nan]
    )
    gain = None if np.isnan(gain) else float(gain)
    short = REPORTED[stage] - tests[stage]
    rows.append(
      [
        tables.STAGE_LABELS[stage],
        tables.fmt(test, digits=2),
        f'{REPORTED[stage]:.2f}',
        f'{-short:+.2f}',
        tables.values_of(stage_runs, lambda r: r['epochs']),
        f'{np.mean([r["wall_seconds"] or 0 for r in stage_runs]) / 60:.1f}',
        f'{epoch_seconds:.0f}',
        '-' if gain is None else f'{gain:+.2f}',
        _more_epochs(short, gain, epoch_seconds),
      ]
    )
  lines = [
    '## Against the reports',
    '',
    "Test accuracy (%) at the best-validation epoch beside the reports' cell (CIFAR-10, "
    'ResNet18, 4 rotations, label smoothing 0.1, all labels; frozen-layer BatchNorm as the '
    "reports' PyTorch). Wall: the run's own time, compile and evaluation included. Last "
    'gain: validation accuracy gained per epoch over the last two epochs, how far the '
    'curve was from flat; more epochs: what a linear continuation of that gain would '
    "need to reach the reports' cell, a lower bound (curves flatten).",
    '',
    tables.markdown_table(
      [
        'stage',
        'rotjax',
        'reports',
        'difference',
        'epochs',
        'wall min',
        's per epoch',
        'last gain (points/epoch)',
        'more epochs to the reports',
      ],
      rows,
    ),
    '',
  ]
  for a, b, what in (
    (2, 3, 'fine-tune pretrained - random init'),
    (4, 5, 'supervised from pretrained - random init'),
  ):
    if a in tests and b in tests:
      lines.append(
        f'- Gap {what}: {tests[a] - tests[b]:+.2f} points '
        f'(reports: {REPORTED[a] - REPORTED[b]:+.2f}).'
      )
  total = sum(r['wall_seconds'] or 0 for r in chosen)
  lines += [f'- Wall time of these runs together: {total / 60:.1f} min.', '']
  return lines


def machine_section(runs) -> list[str]:
  """Where the runs trained (from their study_run.json), one line per distinct machine."""
  seen = {}
  for r in runs:
    env = r.get('environment')
    if env:
      key = (environment.machine_line(env), environment.versions_line(env))
      seen.setdefault(key, (env.get('command', ''), []))[1].append(
        str(r['stage'])
      )
  if not seen:
    return []
  lines = ['## Machine', '']
  for (machine, versions), (command, stages) in seen.items():
    lines += [
      f'- Stages {", ".join(sorted(set(stages)))}: {machine}; {versions}.',
      f'  Command: `{command}`',
    ]
  return lines + ['']
