"""The study: its plan, skip/resume/failure handling (fake training), and one tiny real study."""

import os
import shutil

import jax
import numpy as np
import pytest

from configs import study as study_config
from rotjax import checkpoint
from rotjax import rundir
from rotjax import train
from rotjax.study import report
from rotjax.study import results
from rotjax.study import runner
from rotjax.study import sweep


def _config(workdir, arg='smoke'):
  config = study_config.get_config(arg)
  config.workdir = str(workdir)
  return config


def test_full_study_plan_trains_each_pretext_once_and_before_its_users():
  runs = sweep.plan(_config('/tmp/unused', None))
  names = [r.name for r in runs]
  assert len(names) == len(set(names))
  pretexts = [r for r in runs if r.stage == 1]
  # (model 3 + smoothing 2 + rotations 2 extra settings + the reference) x 3 seeds.
  assert len(pretexts) == 21 and all(r.samples_per_class == 0 for r in pretexts)
  for i, run in enumerate(runs):
    if run.pretext is not None:
      assert names.index(run.pretext.name) < i
  limited = [r for r in runs if r.samples_per_class == 20]
  assert sorted({r.stage for r in limited}) == [2, 5]
  assert {r.pretext.name for r in limited if r.stage == 2} == {
    f'cifar10-resnet18-rot4-ls0.1-spcall-seed{s}/1_pretext' for s in range(3)
  }


def test_gpu_presets_run_the_reports_protocol_and_each_sweep_on_its_stages():
  base = sweep.plan(_config('/tmp/unused', 'gpu'))
  assert [r.stage for r in base] == [1, 2, 3, 4, 5]
  assert {
    (r.model, r.num_rotations, r.label_smoothing, r.samples_per_class, r.seed)
    for r in base
  } == {('resnet18', 4, 0.1, 0, 0)}
  config = _config('/tmp/unused', 'gpu')
  for run in base:
    rc = sweep.run_config(config, run)
    assert (
      rc.optim.name,
      rc.optim.learning_rate,
      rc.optim.decay_every_epochs,
      rc.optim.decay_factor,
    ) == ('adam', 1e-3, 10, 0.1)
    assert (rc.model.width, rc.batch_size, rc.data.max_train_images) == (
      64,
      128,
      0,
    )
    assert (
      rc.num_epochs
      == {'pretext': 30, 'finetune': 20, 'supervised': 30}[rc.stage]
    )
    assert rc.data.source.startswith('folder:')  # the GPU machines have no tfds
  expected = {
    'gpu_labels': (
      {2, 5},
      'samples_per_class',
      {20, 50, 100, 250, 400, 700, 1000, 0},
    ),
    'gpu_rotations': ({1, 2, 4}, 'num_rotations', {4, 6, 8}),
    'gpu_smoothing': ({1, 2, 3, 4, 5}, 'label_smoothing', {0.0, 0.1, 0.2}),
    'gpu_models': (
      {1, 2, 3, 4, 5},
      'model',
      {'resnet18', 'resnet34', 'resnet50'},
    ),
  }
  names = {r.name for r in base}
  for preset, (stages, axis, values) in expected.items():
    runs = sweep.plan(_config('/tmp/unused', preset))
    trained = {r.stage for r in runs if r.stage != 1 or 1 in stages}
    assert trained == stages, preset
    assert {getattr(r, axis) for r in runs if r.stage in stages} == values, (
      preset
    )
    # The reference runs are the :gpu preset's own: one workdir trains them once.
    assert {
      r.name
      for r in runs
      if getattr(r, axis) == getattr(base[0], axis) and r.stage in stages
    } <= names | {r.name for r in runs if r.stage == 1}


def test_run_config_fills_stage_axes_and_dataset_settings(tmp_path):
  config = _config(tmp_path)
  config.datasets.imagenette = {
    'source': 'folder:/data/imagenette',
    'preprocess': 'imagenet',
    'image_size': 64,
    'stem': 'imagenet',
  }
  config.axes.dataset = ('cifar10', 'imagenette')
  runs = {r.name: r for r in sweep.plan(config)}
  run = runs['imagenette-resnet18-rot4-ls0.1-spc4-seed0/2_finetune_pretrained']
  rc = sweep.run_config(config, run)
  assert (rc.stage, rc.trainable, rc.data.samples_per_class) == (
    'finetune',
    ('layer4', 'fc'),
    4,
  )
  assert rc.init_from == os.path.join(
    tmp_path, 'imagenette-resnet18-rot4-ls0.1-spcall-seed0/1_pretext'
  )
  assert (rc.data.image_size, rc.model.stem, rc.data.preprocess) == (
    64,
    'imagenet',
    'imagenet',
  )
  assert rc.workdir == os.path.join(tmp_path, run.name)
  random = sweep.run_config(
    config, runs['cifar10-resnet18-rot4-ls0.1-spcall-seed0/3_finetune_random']
  )
  assert (
    random.init_from == '' and random.data.source == study_config.CIFAR10_FOLDER
  )
  assert config.base.init_from == ''  # the base is copied, never changed


def test_unknown_sweep_or_stage_is_an_error(tmp_path):
  config = _config(tmp_path)
  config.sweeps = ('labelz',)
  with pytest.raises(ValueError, match='labelz'):
    sweep.plan(config)


class FakeTrain:
  """Stands in for train.train_and_evaluate: writes summary.json, a pretext's (tiny, each
  time new) checkpoint and, like train, what an init_from run loaded; fails on chosen runs."""

  trainings = 0  # over all instances: a retrained pretext gets other weights

  def __init__(self, fail=()):
    self.calls, self.fail = [], fail

  def __call__(self, config, dataset=None):
    self.calls.append(
      os.path.relpath(
        config.workdir, os.path.dirname(os.path.dirname(config.workdir))
      )
    )
    if any(config.workdir.endswith(f) for f in self.fail):
      raise RuntimeError('boom')
    os.makedirs(config.workdir, exist_ok=True)
    FakeTrain.trainings += 1
    if config.stage == 'pretext':
      ckpt = checkpoint.Checkpoints(config.workdir)
      ckpt.save(
        config.num_epochs,
        {
          'params': {'w': np.full(3, FakeTrain.trainings, np.float32)},
          'batch_stats': {},
        },
        is_best=True,
      )
      ckpt.close()
    info = {}
    if config.init_from:
      info['init_from_source'] = checkpoint.source_record(
        checkpoint.load_variables(config.init_from), config.workdir
      )
    rundir.write_json(os.path.join(config.workdir, 'run_info.json'), info)
    rundir.write_json(
      os.path.join(config.workdir, 'config.json'), config.to_dict()
    )  # as train does
    summary = {
      'epochs': config.num_epochs,
      'best_val_accuracy': 0.5,
      'test_accuracy': 0.4,
      'min_val_loss': 1.0,
      'wall_seconds': 1.0,
      'images_per_second': 10.0,
    }
    rundir.write_json(os.path.join(config.workdir, 'summary.json'), summary)
    return summary


class FakeReport:
  """Stands in for report.build_report: notes each run's status at every build; may fail."""

  def __init__(self, fail=False):
    self.builds, self.fail = [], fail

  def __call__(self, study_dir):
    self.builds.append(
      {r['workdir']: r['status'] for r in results.collect(study_dir)}
    )
    if self.fail:
      raise RuntimeError('plot bug')
    path = os.path.join(study_dir, 'report.md')
    with open(path, 'w') as f:
      f.write('# study\n\n![a.png](a.png)\n![b c.png](b_c.png)\n')
    return report.Built(path, ['a.png', 'b_c.png'])


def _run(config, fake, monkeypatch):
  monkeypatch.setattr(train, 'train_and_evaluate', fake)
  monkeypatch.setattr(
    report, 'build_report', FakeReport()
  )  # these tests are about the runs
  rows = runner.run_study(
    config, datasets=runner.DatasetCache(lambda data_config: 'DATA')
  )
  return {r['workdir']: r for r in rows}


def test_failed_pretext_skips_its_users_and_the_rest_goes_on(
  tmp_path, monkeypatch
):
  rows = _run(_config(tmp_path), FakeTrain(fail=('1_pretext',)), monkeypatch)
  assert len(rows) == 7
  by_stage = {}
  for row in rows.values():
    by_stage.setdefault(row['stage'], set()).add(row['status'])
  assert by_stage == {
    1: {'failed'},
    2: {'skipped'},
    3: {'done'},
    4: {'skipped'},
    5: {'done'},
  }
  pretext = 'cifar10-resnet18-rot4-ls0.1-spcall-seed0/1_pretext'
  assert rows[pretext]['error'] == 'RuntimeError: boom'
  skipped = rows['cifar10-resnet18-rot4-ls0.1-spc4-seed0/2_finetune_pretrained']
  assert (
    skipped['error'].startswith(f'pretext {pretext} failed')
    and skipped['pretext_run'] == pretext
  )
  csv_rows = results.read_csv(os.path.join(tmp_path, 'results.csv'))
  assert [r['error'] for r in csv_rows if r['status'] == 'failed'] == [
    'RuntimeError: boom'
  ]


def test_rerun_skips_finished_runs_and_resumes_unfinished_ones(
  tmp_path, monkeypatch
):
  config = _config(tmp_path)
  first = FakeTrain(fail=('3_finetune_random',))
  _run(config, first, monkeypatch)
  assert len(first.calls) == 7
  # An interrupted run: its summary is from fewer epochs than the config asks for.
  interrupted = 'cifar10-resnet18-rot4-ls0.1-spcall-seed0/5_supervised_random'
  summary_path = os.path.join(tmp_path, interrupted, 'summary.json')
  rundir.write_json(
    summary_path, {**rundir.read_json(summary_path), 'epochs': 1}
  )
  second = FakeTrain()
  rows = _run(config, second, monkeypatch)
  assert sorted(second.calls) == sorted(
    ['cifar10-resnet18-rot4-ls0.1-spcall-seed0/3_finetune_random', interrupted]
  )
  assert (
    rows[interrupted]['status'] == 'done' and rows[interrupted]['epochs'] == 2
  )
  assert {r['status'] for w, r in rows.items() if w not in second.calls} == {
    'finished'
  }
  manifest = rundir.read_json(os.path.join(tmp_path, 'study.json'))
  assert (
    len(manifest['runs']) == 7
    and manifest['reference']['samples_per_class'] == 0
  )


def test_report_is_rebuilt_after_each_trained_run_and_at_the_end(
  tmp_path, monkeypatch
):
  config, fake_report = _config(tmp_path), FakeReport()
  monkeypatch.setattr(
    train, 'train_and_evaluate', FakeTrain(fail=('3_finetune_random',))
  )
  monkeypatch.setattr(report, 'build_report', fake_report)
  line = runner.run_study_and_report(
    config, datasets=runner.DatasetCache(lambda data_config: 'DATA')
  )
  # One build after each of the 7 runs (the failed one too), each seeing that run's final
  # status (an interrupted study's report is current), then one at the end.
  assert [len(b) for b in fake_report.builds] == [1, 2, 3, 4, 5, 6, 7, 7]
  assert all('running' not in b.values() for b in fake_report.builds)
  assert sorted(fake_report.builds[-1].values()) == ['done'] * 6 + ['failed']
  assert line == (
    f'study {tmp_path}: 7 runs (6 done, 1 failed); wrote {tmp_path}/report.md '
    'and 2 figures beside it: a.png, b_c.png'
  )
  # A rerun trains nothing and still ends with its report.
  rerun_report = FakeReport()
  monkeypatch.setattr(report, 'build_report', rerun_report)
  monkeypatch.setattr(train, 'train_and_evaluate', FakeTrain())
  runner.run_study_and_report(
    config, datasets=runner.DatasetCache(lambda data_config: 'DATA')
  )
  assert len(rerun_report.builds) == 2  # the failed run, retried, and the end
  assert sorted(rerun_report.builds[-1].values()) == ['done'] + ['finished'] * 6


def test_a_failing_report_is_logged_and_the_study_goes_on(
  tmp_path, monkeypatch, caplog
):
  fake_train, fake_report = FakeTrain(), FakeReport(fail=True)
  monkeypatch.setattr(train, 'train_and_evaluate', fake_train)
  monkeypatch.setattr(report, 'build_report', fake_report)
  line = runner.run_study_and_report(
    _config(tmp_path), datasets=runner.DatasetCache(lambda data_config: 'DATA')
  )
  assert len(fake_train.calls) == 7 and len(fake_report.builds) == 8
  assert line == (
    f'study {tmp_path}: 7 runs (7 done); the report failed (error above), '
    f'rebuild: python -m rotjax.report {tmp_path}'
  )
  assert 'RuntimeError: plot bug' in caplog.text
  assert len(results.read_csv(os.path.join(tmp_path, 'results.csv'))) == 7


@pytest.mark.slow
def test_cpu_full_preset_is_the_reports_protocol_at_full_scale_with_fewer_epochs():
  config = _config('/tmp/unused', 'cpu_full')
  runs = sweep.plan(config)
  assert [r.stage for r in runs] == [1, 2, 3, 4, 5]
  for run in runs:
    rc = sweep.run_config(config, run)
    assert (
      rc.optim.name,
      rc.optim.learning_rate,
      rc.optim.decay_every_epochs,
      rc.label_smoothing,
    ) == ('adam', 1e-3, 10, 0.1)
    assert (rc.model.name, rc.model.width, rc.batch_size) == (
      'resnet18',
      64,
      128,
    )
    assert (
      rc.data.max_train_images,
      rc.data.max_eval_images,
      rc.data.val_fraction,
    ) == (0, 0, 0.1)
    assert (
      rc.num_epochs == {'pretext': 3, 'finetune': 2, 'supervised': 4}[rc.stage]
    )
    if run.stage in (2, 3):
      assert tuple(rc.trainable) == ('layer4', 'fc')


def test_cpu_full_onecycle_changes_only_the_schedule():
  plain = _config('/tmp/unused', 'cpu_full')
  onecycle = _config('/tmp/unused', 'cpu_full_onecycle')
  for a, b in zip(sweep.plan(plain), sweep.plan(onecycle), strict=True):
    rc_plain = sweep.run_config(plain, a)
    rc_onecycle = sweep.run_config(onecycle, b)
    assert rc_plain.optim.schedule == ''
    assert rc_onecycle.optim.schedule == 'onecycle'
    rc_onecycle.optim.schedule = ''
    assert rc_plain.to_dict() == rc_onecycle.to_dict()


def test_tiny_study_end_to_end(tmp_path, make_config, image_folder):
  config = _config(tmp_path / 'study')
  config.base = make_config('pretext', tmp_path / 'unused')
  config.datasets.cifar10 = {
    'source': f'folder:{image_folder}',
    'preprocess': 'cifar',
    'image_size': 16,
    'stem': 'cifar',
  }
  config.epochs = {'pretext': 1, 'finetune': 1, 'supervised': 1}
  config.stages, config.sweeps = (2,), ()  # stage 2 pulls in its pretext
  line = runner.run_study_and_report(config)
  rows = results.collect(config.workdir)
  assert [(r['stage'], r['status'], r['epochs']) for r in rows] == [
    (1, 'done', 1),
    (2, 'done', 1),
  ]
  # Each trained run records where and with what it trained.
  env = results.read_record(os.path.join(config.workdir, rows[0]['workdir']))[
    'environment'
  ]
  assert (
    env['versions']['jax'] == jax.__version__
    and env['machine']['backend'] == jax.default_backend()
  )
  finetune = os.path.join(config.workdir, rows[1]['workdir'])
  info = rundir.read_json(os.path.join(finetune, 'run_info.json'))
  assert info['init_from'].startswith(
    os.path.join(config.workdir, rows[0]['workdir']) + os.sep
  )
  # The study alone leaves the report and its figures, and its last line names them.
  report_path = os.path.join(config.workdir, 'report.md')
  assert '| 2 fine-tune pretrained (layer4+fc) |' in open(report_path).read()
  figures = report.build_report(config.workdir).figures
  assert 'curves_cifar10_2_finetune_pretrained.png' in figures
  for name in figures:
    with open(os.path.join(config.workdir, name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n', name
  assert line.endswith(
    f'wrote {report_path} and {len(figures)} figures beside it: '
    + ', '.join(figures)
  )


def test_a_run_trained_with_other_settings_is_stale_not_finished(
  tmp_path, monkeypatch
):
  # A stage 3 trained before freeze_bn existed (its frozen BatchNorm used running statistics)
  # must not be reported, nor resumed, as the planned freeze_bn='batch' run.
  config = _config(tmp_path)
  _run(config, FakeTrain(), monkeypatch)
  old = 'cifar10-resnet18-rot4-ls0.1-spcall-seed0/3_finetune_random'
  path = os.path.join(tmp_path, old, 'config.json')
  saved = rundir.read_json(path)
  del saved['freeze_bn']
  rundir.write_json(path, saved)
  again = FakeTrain()
  rows = _run(config, again, monkeypatch)
  assert again.calls == []
  assert rows[old]['status'] == 'stale' and 'freeze_bn' in rows[old]['error']
  assert 'delete that folder' in rows[old]['error']
  assert {r['status'] for w, r in rows.items() if w != old} == {'finished'}


def test_a_run_from_before_the_streaming_loader_or_model_norm_has_the_planned_settings(
  tmp_path, monkeypatch
):
  # data.loader, data.workers, data.data_dir and checkpoint_every_steps do not change what a
  # run learns: runs trained before they existed (config.json without them) stay finished.
  from rotjax.study import sweep

  config = _config(tmp_path)
  _run(config, FakeTrain(), monkeypatch)
  run_configs = [sweep.run_config(config, run) for run in sweep.plan(config)]
  for rc in run_configs:
    saved = rundir.read(rc.workdir, rundir.CONFIG)
    del saved['checkpoint_every_steps']
    for key in ('loader', 'workers', 'data_dir'):
      del saved['data'][key]
    del saved['model'][
      'norm'
    ]  # before model.norm: its 'auto', run on XLA (report says so)
    rundir.write(rc.workdir, rundir.CONFIG, saved)
  assert [runner.changed_settings(rc) for rc in run_configs] == [[]] * len(
    run_configs
  )
  saved['model']['norm'] = 'xla'  # an explicit other choice counts
  rundir.write(rc.workdir, rundir.CONFIG, saved)
  assert runner.changed_settings(rc) == ['model.norm']
  saved['model']['norm'] = 'auto'
  saved['data']['samples_per_class'] = 7  # a result setting still counts
  rundir.write(rc.workdir, rundir.CONFIG, saved)
  assert runner.changed_settings(rc) == ['data.samples_per_class']


PRETEXT = 'cifar10-resnet18-rot4-ls0.1-spcall-seed0/1_pretext'
FINETUNE = 'cifar10-resnet18-rot4-ls0.1-spcall-seed0/2_finetune_pretrained'
SUPERVISED = 'cifar10-resnet18-rot4-ls0.1-spcall-seed0/4_supervised_pretrained'


def test_a_run_finetuned_from_another_pretext_is_stale_naming_both(
  tmp_path, monkeypatch
):
  # Seeds 0 and 1, each its own pretext; then pretext_seed=0: seed 1's stage 2 keeps its
  # folder name but is planned from seed 0's pretext.
  config = _config(tmp_path)
  config.axes.seed, config.sweeps, config.stages = (0, 1), (), (1, 2)
  _run(config, FakeTrain(), monkeypatch)
  config.pretext_seed = 0
  again = FakeTrain()
  rows = _run(config, again, monkeypatch)
  seed1 = 'cifar10-resnet18-rot4-ls0.1-spcall-seed1/2_finetune_pretrained'
  assert again.calls == [] and rows[seed1]['status'] == 'stale'
  assert 'trained from ../1_pretext step 2' in rows[seed1]['error']
  assert f'planned pretext is ../../{PRETEXT} step 2' in rows[seed1]['error']
  assert rows[FINETUNE]['status'] == 'finished'


def test_runs_from_a_stale_or_retrained_pretext_are_stale_not_averaged(
  tmp_path, monkeypatch
):
  config = _config(tmp_path)
  config.sweeps = ()
  _run(config, FakeTrain(), monkeypatch)
  # The pretext turns stale (trained with other settings): so do the runs made from it.
  path = os.path.join(tmp_path, PRETEXT, 'config.json')
  rundir.write_json(path, {**rundir.read_json(path), 'label_smoothing': 0.3})
  rows = _run(config, FakeTrain(), monkeypatch)
  assert [rows[r]['status'] for r in (PRETEXT, FINETUNE, SUPERVISED)] == [
    'stale'
  ] * 3
  assert rows[FINETUNE]['error'].startswith(f'pretext {PRETEXT} stale')
  # Deleted and retrained: the runs made from the old one are stale, naming both checkpoints.
  shutil.rmtree(os.path.join(tmp_path, PRETEXT))
  again = FakeTrain()
  rows = _run(config, again, monkeypatch)
  assert again.calls == [PRETEXT] and rows[PRETEXT]['status'] == 'done'
  for run in (FINETUNE, SUPERVISED):
    error = rows[run]['error']
    assert rows[run]['status'] == 'stale', rows[run]
    old, new = error.split(' was trained from ')[1].split(
      ', the planned pretext is '
    )
    # The same folder, step and config; other weights.
    assert (
      old.startswith('../1_pretext step 2 (config ') and old[:40] == new[:40]
    )
    assert old.split('arrays ')[1][:12] != new.split('arrays ')[1][:12]
  assert {
    rows[r]['status'] for r in rows if r not in (PRETEXT, FINETUNE, SUPERVISED)
  } == {'finished'}


def test_another_data_source_makes_every_run_stale(tmp_path, monkeypatch):
  config = _config(tmp_path)
  config.sweeps = ()
  _run(config, FakeTrain(), monkeypatch)
  config.datasets.cifar10.source = (
    'tfds:cifar10'  # other pixels than the JPEG copy
  )
  again = FakeTrain()
  rows = _run(config, again, monkeypatch)
  assert again.calls == [] and {r['status'] for r in rows.values()} == {'stale'}
  assert 'data.source' in rows[PRETEXT]['error']
