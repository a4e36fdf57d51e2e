"""report.py and plots.py on fixture run files written here (no training)."""

import json
import os

import numpy as np
import pytest

from configs import study as study_config
from rotjax import rundir
from rotjax.study import plots
from rotjax.study import report
from rotjax.study import results
from rotjax.study import sweep
from rotjax.study import tables


def _write_run(
  study_dir,
  run: sweep.Run,
  val_acc: float,
  *,
  epochs=2,
  status='done',
  record=True,
  num_epochs=2,
  legacy=False,
):
  """A run's files as the study writes them: metrics.jsonl, summary, config, run_info."""
  workdir = os.path.join(study_dir, run.name)
  os.makedirs(workdir)
  history = [
    {
      'epoch': e,
      'step': 10 * e,
      'learning_rate': 1e-3,
      'train_loss': 2.0 / e,
      'train_accuracy': val_acc - 0.1 / e,
      'val_loss': 2.1 / e + (1 - val_acc),
      'val_accuracy': val_acc - 0.05 * (epochs - e),
      'test_loss': 2.2 / e,
      'test_accuracy': val_acc - 0.01 - 0.05 * (epochs - e),
      'train_seconds': 1.0,
      'epoch_seconds': 1.5,
      'images_per_second': 100.0,
    }
    for e in range(1, epochs + 1)
  ]
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in history)
  rundir.write_json(
    os.path.join(workdir, 'summary.json'),
    {
      'epochs': epochs,
      'best_epoch': epochs,
      'best_val_accuracy': history[-1]['val_accuracy'],
      'test_accuracy': history[-1]['test_accuracy'],
      'min_val_loss': min(r['val_loss'] for r in history),
      'final_test_accuracy': 0.0,
      'train_seconds': 2.0,
      'wall_seconds': 3.0,
      'images_per_second': 100.0,
    },
  )
  stage_name = sweep.STAGES[run.stage][1]
  pretext = run.pretext.name if run.pretext else ''
  rundir.write_json(
    os.path.join(workdir, 'config.json'),
    {
      'stage': stage_name,
      'num_epochs': num_epochs,
      'seed': run.seed,
      'batch_size': 16,
      'label_smoothing': run.label_smoothing,
      'trainable': ['all'],
      **(
        {} if legacy else {'freeze_bn': run.freeze_bn}
      ),  # legacy: before freeze_bn existed
      'init_from': os.path.join(study_dir, pretext) if pretext else '',
      'model': {'name': run.model, 'width': 16, 'dtype': 'bfloat16'},
      'data': {
        'dataset': run.dataset,
        'image_size': 32,
        'samples_per_class': run.samples_per_class,
      },
      'rotation': {'num_rotations': run.num_rotations},
      'optim': {'name': 'adam', 'learning_rate': 1e-3},
    },
  )
  rundir.write_json(
    os.path.join(workdir, 'run_info.json'),
    {
      'train_images': 8000
      if not run.samples_per_class
      else 10 * run.samples_per_class,
      'val_images': 1000,
      'test_images': 1000,
      'class_names': [str(i) for i in range(10)],
      'num_devices': 1,
    },
  )
  if record:
    results.write_record(
      workdir,
      {
        'name': run.name,
        'stage': run.stage,
        **run.axes(),
        'pretext_run': pretext,
        'status': status,
        'error': '',
      },
    )
  return workdir


# Fine-tuned pretrained wins at 10 and 100 labels per class, random init wins at 'all' (800).
SPC_ACC = {
  (2, 10): 0.40,
  (5, 10): 0.20,
  (2, 100): 0.50,
  (5, 100): 0.45,
  (2, 0): 0.60,
  (5, 0): 0.70,
}


# Stages 2 and 3 with freeze_bn='running' (the reference runs use 'batch').
BN_RUNNING_ACC = {2: 0.55, 3: 0.25}


@pytest.fixture(scope='module')
def study_dir(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp('study')
  base = dict(
    dataset='cifar10', model='resnet18', num_rotations=4, samples_per_class=0
  )
  for seed, delta in ((0, -0.1), (1, 0.1)):
    for stage in (1, 3, 4):
      _write_run(
        tmp_path,
        sweep.Run(stage, label_smoothing=0.1, seed=seed, **base),
        0.5 + delta,
      )
    for ls in (0.0, 0.2):
      _write_run(
        tmp_path, sweep.Run(1, label_smoothing=ls, seed=seed, **base), 0.3
      )
    for (stage, spc), acc in SPC_ACC.items():
      run = sweep.Run(
        stage,
        label_smoothing=0.1,
        seed=seed,
        **{**base, 'samples_per_class': spc},
      )
      _write_run(tmp_path, run, acc)
    for stage, acc in BN_RUNNING_ACC.items():
      _write_run(
        tmp_path,
        sweep.Run(
          stage, label_smoothing=0.1, seed=seed, freeze_bn='running', **base
        ),
        acc,
      )
  rundir.write_json(
    os.path.join(tmp_path, 'study.json'),
    {
      'reference': {
        'dataset': 'cifar10',
        'model': 'resnet18',
        'num_rotations': 4,
        'label_smoothing': 0.1,
        'samples_per_class': 0,
        'seed': 0,
      }
    },
  )
  failed = sweep.Run(2, 'cifar10', 'resnet50', 4, 0.1, 0, 0)
  results.write_record(
    os.path.join(tmp_path, failed.name),
    {
      'name': failed.name,
      'stage': 2,
      **failed.axes(),
      'pretext_run': '',
      'status': 'failed',
      'error': 'ValueError: boom',
    },
  )
  return str(tmp_path)


@pytest.fixture(scope='module')
def report_text(study_dir):
  with open(report.build_report(study_dir).path) as f:
    return f.read()


def test_results_csv_has_one_row_per_run_with_pretext_and_numbers(
  study_dir, report_text
):
  rows = results.read_csv(os.path.join(study_dir, 'results.csv'))
  assert len(rows) == 2 * (3 + 2 + len(SPC_ACC) + len(BN_RUNNING_ACC)) + 1
  assert set(rows[0]) == set(results.COLUMNS)
  finetune = [
    r for r in rows if r['stage'] == '2' and r['samples_per_class'] == '10'
  ]
  assert len(finetune) == 2
  assert (
    finetune[0]['pretext_run']
    == 'cifar10-resnet18-rot4-ls0.1-spcall-seed0/1_pretext'
  )
  assert float(finetune[0]['best_val_accuracy']) == pytest.approx(0.40)
  assert [r['status'] for r in rows].count('done') == len(rows) - 1


def test_report_tables_cells_are_mean_std_n_and_only_tables_with_data(
  study_dir, report_text
):
  text = report_text
  assert '### Stage × model' in text and '### Stage × label smoothing' in text
  assert (
    '### Stage × rotations' not in text
  )  # one rotation count only: no table
  # Stage 1 at the reference: val 0.4 and 0.6 -> test 0.39 / 0.59.
  model_table = text.split('### Stage × model')[1]
  pretext_row = next(
    l
    for l in model_table.splitlines()
    if l.startswith('| 1 rotation pretext |')
  )
  assert '49.0 ± 14.1 (n=2)' in pretext_row
  assert '### Samples per class' in text
  assert '| 10 |' in text and 'all (800)' in text
  assert (
    'width' in text and 'bfloat16' in text and '8000' in text
  )  # settings from config.json
  for name in (
    'stages_cifar10_model.png',
    'stages_cifar10_label_smoothing.png',
    'samples_per_class_cifar10.png',
    'curves_cifar10_1_pretext.png',
    'curves_cifar10_5_supervised_random.png',
  ):
    assert f']({name})' in text
    assert os.path.getsize(os.path.join(study_dir, name)) > 10_000


def test_each_stage_stands_beside_the_reports_cell_with_its_distance_from_flat(
  report_text,
):
  section = report_text.split('## Against the reports')[1].split('\n## ')[0]
  rows = {
    line.split('|')[1].strip(): [c.strip() for c in line.split('|')[2:-1]]
    for line in section.splitlines()
    if line.startswith('| ') and 'stage' not in line
  }
  # Stage 1: seeds at 39% and 59% test; validation rose 5 points in the last epoch.
  test, reported, difference, epochs, _, _, gain, more = rows[
    '1 rotation pretext'
  ]
  assert (test, reported, difference, epochs, gain) == (
    '49.00 ± 14.14 (n=2)',
    '79.07',
    '-30.07',
    '2',
    '+5.00',
  )
  assert more.startswith('>= 7 ')  # 30.07 points at 5 points an epoch
  assert rows['5 supervised from random init'][2] == '-14.42'
  assert rows['5 supervised from random init'][7].startswith('>= 3 ')
  # Only the reports' setting: all labels, batch-statistics BatchNorm in frozen layers.
  assert rows['2 fine-tune pretrained (layer4+fc)'][0] == '59.00 ± 0.00 (n=2)'
  assert (
    '- Gap fine-tune pretrained - random init: +10.00 points (reports: +15.10).'
    in section
  )
  assert (
    '- Gap supervised from pretrained - random init: -20.00 points (reports: +1.32).'
    in section
  )


def test_frozen_bn_table_has_stages_2_and_3_both_ways(study_dir, report_text):
  section = report_text.split('### Stage × frozen-layer BatchNorm')[1].split(
    '###'
  )[0]
  assert '| stage | freeze_bn=batch | freeze_bn=running |' in section
  rows = [
    l for l in section.splitlines() if l.startswith('| ') and l[2].isdigit()
  ]
  # Stage 2 at the reference: val 0.60 -> test 0.59 for both seeds; stage 3: 0.4/0.6 -> 0.39/0.59.
  assert rows == [
    '| 2 fine-tune pretrained (layer4+fc) | 59.0 ± 0.0 (n=2) | 54.0 ± 0.0 (n=2) |',
    '| 3 fine-tune random init (layer4+fc) | 49.0 ± 14.1 (n=2) | 24.0 ± 0.0 (n=2) |',
  ]
  # The other tables hold freeze_bn at the reference: the running runs are not in them.
  model_table = report_text.split('### Stage × model')[1].split('###')[0]
  assert '54.0' not in model_table and '24.0' not in model_table
  assert ']({})'.format('stages_cifar10_freeze_bn.png') in report_text


def test_bn_runs_have_their_own_folders_and_share_the_pretext():
  run = sweep.Run(3, 'cifar10', 'resnet18', 4, 0.1, 0, 0, freeze_bn='running')
  assert (
    run.name
    == 'cifar10-resnet18-rot4-ls0.1-spcall-seed0-bnrunning/3_finetune_random'
  )
  pretrained = sweep.Run(
    2, 'cifar10', 'resnet18', 4, 0.1, 0, 0, freeze_bn='running'
  )
  assert (
    pretrained.pretext.name
    == 'cifar10-resnet18-rot4-ls0.1-spcall-seed0/1_pretext'
  )
  # Nothing frozen, nothing to choose: stage 4 is the one reference run either way.
  assert sweep.Run(
    4, 'cifar10', 'resnet18', 4, 0.1, 0, 0, freeze_bn='running'
  ).name == ('cifar10-resnet18-rot4-ls0.1-spcall-seed0/4_supervised_pretrained')
  # The full study's `bn` sweep: stages 2 and 3 of each seed once more, with running statistics.
  config = study_config.get_config()
  config.workdir = '/tmp/unused'
  running = [r for r in sweep.plan(config) if r.freeze_bn == 'running']
  assert sorted((r.stage, r.seed) for r in running) == [
    (s, k) for s in (2, 3) for k in range(3)
  ]
  assert {sweep.run_config(config, r).freeze_bn for r in running} == {'running'}


def test_run_trained_before_freeze_bn_is_reported_as_running(tmp_path):
  """Its folder now names the default; its config.json says how it really trained."""
  _write_run(
    tmp_path,
    sweep.Run(3, 'cifar10', 'resnet18', 4, 0.1, 0, 0),
    0.5,
    legacy=True,
  )
  (run,) = report.load_runs(str(tmp_path))
  assert run['freeze_bn'] == 'running'


def test_accuracy_crossover_is_interpolated_between_100_and_all(report_text):
  text = report_text
  # d(100) = +0.05, d(800) = -0.10: a third of the way from 100 to 800 in log x.
  expected = np.exp(np.log(100) + (np.log(800) - np.log(100)) / 3)
  assert (
    f'Accuracy crossover (labels per class, interpolated in log x): {expected:.0f}.'
    in text
  )


def test_crossovers_finds_sign_changes_and_none():
  assert plots.crossovers([10, 1000], [1.0, 0.0], [0.0, 1.0]) == pytest.approx(
    [100.0]
  )
  assert plots.crossovers([10, 100, 1000], [1, 2, 3], [0, 1, 2]) == []
  assert (
    plots.crossovers([10, 100], [1, 2], [1, 1]) == []
  )  # a tie at one end is not a crossing
  assert plots.crossovers([10, 100, 1000], [1, 2, 3], [0, 2, 4]) == [100.0]


def test_failed_run_is_listed_and_left_out_of_the_tables(report_text):
  text = report_text
  assert 'ValueError: boom' in text and 'model=resnet50' not in text


def test_run_without_study_record_is_read_from_its_config(tmp_path):
  run = sweep.Run(4, 'cifar10', 'resnet18', 4, 0.1, 0, 0)
  _write_run(tmp_path, run, 0.8, record=False)
  (row,) = results.collect(str(tmp_path))
  assert (row['stage'], row['status'], row['best_val_accuracy']) == (
    4,
    'finished',
    0.8,
  )


def test_cpu_preset_seeds_share_one_pretext_and_vary_stages_2_and_3():
  # Error bars on fine-tune pretrained vs random init, the pretext trained once.
  config = study_config.get_config('cpu')
  config.workdir = '/tmp/study'
  runs = sweep.plan(config)
  pretexts = [r for r in runs if r.stage == 1]
  assert {r.seed for r in pretexts} == {0}
  assert sorted(r.num_rotations for r in pretexts) == [
    4,
    6,
    8,
  ]  # compared on one footing
  pretexts = [r for r in pretexts if r.num_rotations == 4]
  for stage in (2, 3):
    seeds = sorted(
      r.seed
      for r in runs
      if r.stage == stage
      and r.samples_per_class == 0
      and r.freeze_bn == 'batch'
    )
    assert seeds == [0, 1, 2], (stage, seeds)
  loaded = {r.pretext.name for r in runs if r.pretext is not None}
  assert loaded == {pretexts[0].name}
  seed2 = next(r for r in runs if r.stage == 2 and r.seed == 2)
  assert sweep.run_config(config, seed2).init_from.endswith(pretexts[0].name)
  assert sweep.run_config(config, seed2).seed == 2


def test_by_default_every_seed_has_its_own_pretext():
  config = study_config.get_config()
  config.workdir = '/tmp/study'
  assert sorted({r.seed for r in sweep.plan(config) if r.stage == 1}) == [
    0,
    1,
    2,
  ]
  config.pretext_seed = -2
  with pytest.raises(ValueError, match='pretext_seed=-2'):
    sweep.plan(config)


def test_pretext_runs_from_before_rotation_geometry_are_labelled_by_what_they_used(
  tmp_path,
):
  # Their config.json has no rotation.geometry: N = 4 then meant exact rot90 of the square,
  # N = 6 and 8 were only ever possible on the disc.
  for n in (4, 6, 8):
    _write_run(tmp_path, sweep.Run(1, 'cifar10', 'resnet18', n, 0.1, 0, 0), 0.5)
  table = tables.settings_table(
    report.completed(report.load_runs(str(tmp_path)))
  )
  assert '| 4 x square, 6 x disc, 8 x disc |' in table
