import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rotjax import batch_plans
from rotjax import input_pipeline
from rotjax import metrics
from rotjax import data_parallel
from rotjax import rundir
from rotjax import steps
from rotjax import train


from rotjax import run_state


def test_label_smoothing_matches_formula():
  logits = jnp.asarray([[2.0, -1.0, 0.5], [0.0, 1.0, 3.0]])
  labels = jnp.asarray([0, 2])
  for alpha in (0.0, 0.1, 0.2):
    log_p = np.asarray(jax.nn.log_softmax(logits))
    target = np.full((2, 3), alpha / 3)
    target[np.arange(2), labels] += 1 - alpha
    expected = -(target * log_p).sum(-1)
    np.testing.assert_allclose(
      steps.cross_entropy(logits, labels, alpha), expected, rtol=1e-6
    )
  np.testing.assert_allclose(
    steps.cross_entropy(logits, labels, 0.0),
    optax.softmax_cross_entropy_with_integer_labels(logits, labels),
    rtol=1e-6,
  )


def _step_on(devices, state, mask, batch, mode='auto'):
  """One train step on `devices` with deterministic inputs (normalisation only)."""
  from rotjax import preprocess

  prepare = lambda batch, rng: (
    preprocess.normalize(
      batch['image'], preprocess.CIFAR_MEAN, preprocess.CIFAR_STD
    ),
    batch['label'],
    batch['mask'],
  )
  dp = data_parallel.DataParallel(mode, devices)
  step = steps.compiled_train_step(
    None, mask, dp, smoothing=0.1, prepare_fn=prepare, donate=False
  )
  new_state, m = step(
    dp.put(state), dp.put_batch(batch), dp.put(jax.random.key(0))
  )
  return dp.get(m), dp.get(new_state)


@pytest.mark.slow
@pytest.mark.skipif(
  jax.local_device_count() < 2, reason='needs 2 devices (XLA_FLAGS)'
)
@pytest.mark.parametrize('mode', ['jit', 'pmap'])
def test_one_and_two_devices_agree_on_the_same_global_batch(
  make_config, tmp_path, mode
):
  # SGD, not Adam: Adam's first step is +-lr for any gradient, so a gradient that is
  # zero up to rounding could flip sign between the two summation orders.
  config = make_config(
    'supervised', tmp_path, **{'optim.name': 'sgd', 'optim.warmup_epochs': 0}
  )
  dataset = input_pipeline.load_dataset(config.data)
  state, mask, _, _ = run_state.create_train_state(
    config, dataset.num_classes, 4
  )
  batch = next(batch_plans.train_batches(dataset.train, 8, 0, 1))
  one = _step_on(jax.local_devices()[:1], state, mask, batch, mode)
  two = _step_on(jax.local_devices()[:2], state, mask, batch, mode)
  # Synced BatchNorm + pmean'd gradients: the same maths, summed in a different order.
  np.testing.assert_allclose(one[0]['loss'], two[0]['loss'], rtol=1e-5)
  for a, b in zip(
    jax.tree.leaves(one[1].params), jax.tree.leaves(two[1].params)
  ):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  for a, b in zip(
    jax.tree.leaves(one[1].batch_stats), jax.tree.leaves(two[1].batch_stats)
  ):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(
  jax.local_device_count() < 2, reason='needs 2 devices (XLA_FLAGS)'
)
def test_padded_rows_carry_no_weight_and_the_loss_is_the_mean_over_real_rows(
  make_config, tmp_path
):
  """An epoch's last batch: 5 real rows, 3 repeats of them with mask 0. On 2 devices the real
  rows split 4 / 1, so the mean must be taken over the global batch, not per device."""
  from rotjax import preprocess

  config = make_config(
    'supervised', tmp_path, **{'optim.name': 'sgd', 'optim.warmup_epochs': 0}
  )
  dataset = input_pipeline.load_dataset(config.data)
  state, mask, _, _ = run_state.create_train_state(
    config, dataset.num_classes, 4
  )
  rows = np.array([0, 1, 2, 3, 4, 0, 1, 2])
  batch = {
    'image': dataset.train.images[rows],
    'label': dataset.train.labels[rows],
    'mask': np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32),
  }
  devices = jax.local_devices()[:2]
  metrics, stepped = _step_on(devices, state, mask, batch)
  # The same forward pass (BatchNorm over all 8 rows), then the mean over the 5 real rows.
  forward = jax.pmap(
    lambda images: state.apply_fn(
      {'params': state.params, 'batch_stats': state.batch_stats},
      preprocess.normalize(images, preprocess.CIFAR_MEAN, preprocess.CIFAR_STD),
      train=True,
      mutable=['batch_stats'],
    )[0][0],
    axis_name='data',
    devices=devices[:1],
  )
  logits = forward(batch['image'][None])[0]
  losses = np.asarray(steps.cross_entropy(logits, batch['label'], 0.1))
  np.testing.assert_allclose(metrics['loss'], losses[:5].mean(), rtol=1e-5)
  correct = np.asarray(jnp.argmax(logits, -1) == batch['label'])
  np.testing.assert_allclose(metrics['accuracy'], correct[:5].mean(), rtol=1e-6)
  # Labels of the padded rows change nothing.
  relabelled = {
    **batch,
    'label': np.where(
      batch['mask'] == 1,
      batch['label'],
      (batch['label'] + 1) % dataset.num_classes,
    ),
  }
  _, other = _step_on(devices, state, mask, relabelled)
  for a, b in zip(
    jax.tree.leaves(stepped.params), jax.tree.leaves(other.params)
  ):
    np.testing.assert_array_equal(a, b)


def test_resuming_with_another_epoch_length_is_an_error():
  rundir._check_epoch_length(
    {'epoch': 2, 'step': 14}, 7, 'run'
  )  # same settings: fine
  with pytest.raises(
    ValueError, match='run was trained with 6 steps per epoch, this run has 7'
  ):
    rundir._check_epoch_length({'epoch': 2, 'step': 12}, 7, 'run')


@pytest.mark.gpu
@pytest.mark.parametrize('mode', ['jit', 'pmap'])
def test_replicated_state_is_laid_out_like_step_outputs_so_step_2_compiles_nothing(
  make_config, tmp_path, mode
):
  config = make_config('supervised', tmp_path)
  dataset = input_pipeline.load_dataset(config.data)
  state, mask, _, _ = run_state.create_train_state(
    config, dataset.num_classes, 4
  )
  dp = data_parallel.DataParallel(mode, jax.local_devices())
  step = steps.compiled_train_step(
    config, mask, dp, smoothing=0.1, donate=False
  )
  batch = dp.put_batch(next(batch_plans.train_batches(dataset.train, 8, 0, 1)))
  replicated = dp.put(state)
  rng = dp.put(jax.random.key(0))
  out, _ = step(replicated, batch, rng)
  for a, b in zip(jax.tree.leaves(replicated), jax.tree.leaves(out)):
    assert (a.sharding, a.dtype, a.shape) == (b.sharding, b.dtype, b.shape)
  messages = []
  handler = logging.Handler()
  handler.emit = lambda record: messages.append(record.getMessage())
  logging.getLogger('jax').addHandler(handler)
  try:
    with jax.log_compiles():
      jax.block_until_ready(step(out, batch, rng))
  finally:
    logging.getLogger('jax').removeHandler(handler)
  assert not [m for m in messages if m.startswith('Compiling')], messages


@pytest.mark.slow
@pytest.mark.gpu
def test_smoke_pretext_end_to_end_writes_metrics_and_checkpoints(
  make_config, tmp_path
):
  config = make_config('pretext', tmp_path / 'pre')
  summary = train.train_and_evaluate(config)
  rows = metrics.read_metrics(str(tmp_path / 'pre'))
  assert [r['epoch'] for r in rows] == [1, 2]
  for key in (
    'train_loss',
    'train_accuracy',
    'val_loss',
    'val_accuracy',
    'test_loss',
    'test_accuracy',
  ):
    assert np.isfinite(rows[-1][key])
  assert summary['epochs'] == 2
  # 54 training images at batch 8: 7 steps, the last one padded (dropping it left 6 unseen).
  assert [r['step'] for r in rows] == [7, 14]
  assert os.listdir(tmp_path / 'pre' / 'checkpoints')
  assert json.load(open(tmp_path / 'pre' / 'config.json'))['stage'] == 'pretext'


@pytest.mark.slow
def test_run_stopped_after_epoch_one_resumes_at_saved_step(
  make_config, tmp_path
):
  workdir = tmp_path / 'run'
  reference = train.train_and_evaluate(
    make_config('supervised', tmp_path / 'ref', num_epochs=3)
  )
  first = train.train_and_evaluate(
    make_config('supervised', workdir, num_epochs=1)
  )
  assert first['epochs'] == 1
  saved = sorted(
    int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit()
  )
  resumed = train.train_and_evaluate(
    make_config('supervised', workdir, num_epochs=3)
  )
  rows = metrics.read_metrics(str(workdir))
  assert [r['epoch'] for r in rows] == [1, 2, 3]
  assert rows[1]['step'] == 2 * saved[-1]
  # Data order and random numbers are keyed on (seed, epoch, step): same result as unbroken.
  ref_rows = metrics.read_metrics(str(tmp_path / 'ref'))
  for a, b in zip(rows, ref_rows):
    np.testing.assert_allclose(a['val_loss'], b['val_loss'], rtol=1e-5)
  assert resumed['best_val_accuracy'] == pytest.approx(
    reference['best_val_accuracy']
  )


def test_epoch_means_weigh_steps_by_their_real_images(
  make_config, tmp_path, monkeypatch
):
  # 129 images at batch 128: the second step holds one real image (and 127 masked repeats);
  # it must count for one image in the epoch's train loss and accuracy, not for a whole step.
  config = make_config('supervised', tmp_path, batch_size=128, num_epochs=1)
  loaded = input_pipeline.load_dataset(config.data)
  rows = np.arange(129) % len(loaded.train)
  dataset = input_pipeline.Dataset(
    loaded.train.take(rows), loaded.val, loaded.test, loaded.class_names
  )
  fetched = []
  check = train._check_finite
  monkeypatch.setattr(
    train, '_check_finite', lambda f, *a: (fetched.extend(f), check(f, *a))
  )
  train.train_and_evaluate(config, dataset=dataset)
  assert len(fetched) == 2
  row = metrics.read_metrics(str(tmp_path))[0]
  for key, name in (('loss', 'train_loss'), ('accuracy', 'train_accuracy')):
    expected = (128 * float(fetched[0][key]) + float(fetched[1][key])) / 129
    np.testing.assert_allclose(row[name], expected, rtol=1e-6)
  assert row['train_loss'] != pytest.approx(
    (float(fetched[0]['loss']) + float(fetched[1]['loss'])) / 2
  )


@pytest.mark.slow
@pytest.mark.skipif(
  jax.local_device_count() < 2, reason='needs 2 devices (XLA_FLAGS)'
)
def test_per_device_batchnorm_pools_running_statistics_with_the_spread_between_devices(
  make_config, tmp_path
):
  # sync_bn=False: each device normalises with its own rows' statistics, but the running
  # statistics must be those of the global batch. The first BatchNorm sees the same inputs
  # on 1 and 2 devices, so its running mean and variance must agree; averaging per-device
  # variances would miss the spread between the devices' means.
  config = make_config(
    'supervised',
    tmp_path,
    **{'optim.name': 'sgd', 'optim.warmup_epochs': 0, 'model.sync_bn': False},
  )
  dataset = input_pipeline.load_dataset(config.data)
  state, mask, _, _ = run_state.create_train_state(
    config, dataset.num_classes, 4
  )
  # Class by class, as a folder split lists them: the two halves hold different classes.
  rows = np.argsort(dataset.train.labels, kind='stable')[::3][:8]
  batch = {
    'image': dataset.train.images[rows],
    'label': dataset.train.labels[rows],
    'mask': np.ones(8, np.float32),
  }
  assert set(batch['label'][:4]) != set(batch['label'][4:])
  one = _step_on(jax.local_devices()[:1], state, mask, batch)[1].batch_stats[
    'bn1'
  ]
  two = _step_on(jax.local_devices()[:2], state, mask, batch)[1].batch_stats[
    'bn1'
  ]
  np.testing.assert_allclose(two['mean'], one['mean'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(two['var'], one['var'], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(
  jax.local_device_count() < 2, reason='needs 2 devices (XLA_FLAGS)'
)
def test_per_device_batchnorm_trains_alike_on_one_and_two_devices(
  make_config, tmp_path
):
  # sync_bn=False normalises each device's part of the batch alone. With the folder's
  # class-by-class rows in index order, device 0 held the low classes: its statistics told
  # the labels apart and the train loss moved with the device count (mean gap 0.049 over 3
  # epochs, against 0.017 with mixed rows, on a Zen 5; float32 here).
  losses = []
  for devices in (1, 2):
    config = make_config(
      'supervised',
      tmp_path / str(devices),
      num_epochs=3,
      batch_size=16,
      num_devices=devices,
      **{'model.sync_bn': False},
    )
    train.train_and_evaluate(config)
    losses.append(
      [r['train_loss'] for r in metrics.read_metrics(config.workdir)]
    )
  assert np.mean(np.abs(np.subtract(*losses))) < 0.035, losses


def _bf16_then_not(monkeypatch, make_config, workdir, **overrides):
  """Epoch 1 where `auto` picks bfloat16, then a resume where it would pick float32."""
  from rotjax import compute

  monkeypatch.setattr(compute, 'native_bf16', lambda backend=None: True)
  train.train_and_evaluate(
    make_config('supervised', workdir, num_epochs=1, **{'model.dtype': 'auto'})
  )
  first = json.load(open(workdir / 'run_info.json'))['compute']
  assert first['dtype'] == 'bfloat16'
  monkeypatch.setattr(compute, 'native_bf16', lambda backend=None: False)
  config = make_config(
    'supervised', workdir, num_epochs=2, **{'model.dtype': 'auto', **overrides}
  )
  return first, config


@pytest.mark.slow
def test_a_resumed_run_keeps_the_dtype_and_convolutions_of_its_first_start(
  make_config, tmp_path, monkeypatch
):
  first, config = _bf16_then_not(monkeypatch, make_config, tmp_path)
  train.train_and_evaluate(config)
  info = json.load(open(tmp_path / 'run_info.json'))
  assert (info['compute']['dtype'], info['compute']['conv']) == (
    first['dtype'],
    first['conv'],
  )
  assert [
    (r['dtype'], r['conv']) for r in metrics.read_metrics(str(tmp_path))
  ] == [(first['dtype'], first['conv'])] * 2
  assert json.load(open(tmp_path / 'config.json'))['model']['dtype'] == 'auto'


@pytest.mark.slow
def test_a_run_from_before_model_norm_resumes_on_xla_batchnorm(
  make_config, tmp_path
):
  """A run whose first start recorded no `norm` (the release before training BatchNorm could
  run on oneDNN) goes on with XLA's BatchNorm, as it started; each epoch's row says which."""
  overrides = {
    'model.sync_bn': False
  }  # per-device statistics: oneDNN takes them
  train.train_and_evaluate(
    make_config('supervised', tmp_path, num_epochs=1, **overrides)
  )
  info = json.load(open(tmp_path / 'run_info.json'))
  first = info['compute'].pop('norm')
  info['compute'].pop('norm_reason')
  assert first == info['compute']['conv']  # 'onednn' where the convolutions are
  json.dump(info, open(tmp_path / 'run_info.json', 'w'))
  train.train_and_evaluate(
    make_config('supervised', tmp_path, num_epochs=2, **overrides)
  )
  assert [r['norm'] for r in metrics.read_metrics(str(tmp_path))] == [
    first,
    'xla',
  ]


@pytest.mark.slow
def test_a_resume_the_machine_cannot_continue_is_refused_unless_overridden(
  make_config, tmp_path, monkeypatch
):
  from rotjax.cpu import onednn_conv

  first, config = _bf16_then_not(monkeypatch, make_config, tmp_path)
  if first['conv'] != 'onednn':
    pytest.skip('needs oneDNN bfloat16 convolutions for the first start')
  monkeypatch.setattr(
    onednn_conv, 'uses_onednn', lambda impl, dtype: (False, 'no bf16 kernels')
  )
  with pytest.raises(
    ValueError, match=r'(?s)bfloat16 on oneDNN.*no bf16 kernels.*model.conv=xla'
  ):
    train.train_and_evaluate(config)
  # An explicit choice continues, and each epoch's row says what it ran with.
  config.model.dtype = 'float32'
  train.train_and_evaluate(config)
  rows = metrics.read_metrics(str(tmp_path))
  assert [(r['dtype'], r['conv']) for r in rows] == [
    ('bfloat16', 'onednn'),
    ('float32', 'xla'),
  ]
  info = json.load(open(tmp_path / 'run_info.json'))
  assert (
    info['compute']['dtype'] == 'bfloat16'
    and info['compute_now']['dtype'] == 'float32'
  )


@pytest.mark.slow
def test_a_resume_whose_init_from_was_retrained_is_refused(
  make_config, tmp_path
):
  import shutil

  pre, fine = tmp_path / 'pre', tmp_path / 'fine'
  train.train_and_evaluate(make_config('pretext', pre, num_epochs=1))
  train.train_and_evaluate(
    make_config('finetune', fine, num_epochs=1, init_from=str(pre))
  )
  source = json.load(open(fine / 'run_info.json'))['init_from_source']
  assert (source['run'], source['step']) == ('../pre', 7)
  shutil.rmtree(pre)
  train.train_and_evaluate(make_config('pretext', pre, num_epochs=1, seed=1))
  with pytest.raises(
    ValueError,
    match=r'started from \.\./pre step 7 .* init_from now holds \.\./pre step 7',
  ):
    train.train_and_evaluate(
      make_config('finetune', fine, num_epochs=2, init_from=str(pre))
    )
