import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from rotjax import bn_stats
from rotjax import checkpoint as checkpoint_lib
from rotjax import data_parallel
from rotjax import input_pipeline
from rotjax import models
from rotjax import train


from rotjax import run_state


def _model_and_wrong_stats():
  """A width-4 ResNet18 whose running statistics belong to other images (mean 3, var 7)."""
  module = models.create_model(
    'resnet18',
    num_classes=4,
    width=4,
    axis_name='data',
    stats_axis_name='data',
  )
  variables = module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  wrong = {
    k: jnp.full_like(v, 3.0 if k[-1] == 'mean' else 7.0)
    for k, v in traverse_util.flatten_dict(variables['batch_stats']).items()
  }
  return module, {
    'params': variables['params'],
    'batch_stats': traverse_util.unflatten_dict(wrong),
  }


def _bn_inputs(module, variables, images, devices):
  """Each BatchNorm's input in train mode, from the convolution before it (captured by flax,
  not by the sown moments): {BatchNorm path: [N, H, W, C]}."""
  apply = jax.pmap(
    lambda v, x: module.apply(
      v,
      x,
      train=True,
      mutable=['batch_stats', 'intermediates'],
      capture_intermediates=lambda m, _: isinstance(m, nn.Conv),
    )[1]['intermediates'],
    axis_name='data',
    devices=devices,
  )
  captured = traverse_util.flatten_dict(
    apply(jax.tree.map(lambda x: x[None], variables), images[None])
  )
  # ('layer2', '0', 'downsample_conv', '__call__') -> 'layer2/0/downsample_bn'
  return {
    '/'.join((*k[:-2], k[-2].replace('conv', 'bn'))): np.asarray(
      v[0][0], np.float64
    )
    for k, v in captured.items()
  }


def test_reestimate_gives_the_frozen_layers_the_statistics_of_the_new_images():
  """Running statistics deliberately wrong for the images; after the pass each chosen
  BatchNorm holds the mean and variance of its input over all the images (two batches, each
  in train mode), the other layers and every weight as they were."""
  module, variables = _model_and_wrong_stats()
  before = jax.device_get(variables)
  devices = jax.local_devices()[:1]
  images = jax.random.normal(jax.random.key(1), (2, 8, 16, 16, 3)) * 2.0 + 0.5
  one_device = data_parallel.DataParallel('auto', devices)
  p_moments = one_device.compile(
    functools.partial(
      bn_stats.moments_step,
      module=module,
      prepare_fn=lambda batch, _: batch['image'],
    ),
    batch_args=(1,),
  )
  keep = lambda path: not path.startswith('layer4')
  stats, record = bn_stats.reestimate(
    p_moments, variables, [{'image': x} for x in images], keep, one_device
  )
  inputs = [_bn_inputs(module, variables, x, devices) for x in images]
  new = traverse_util.flatten_dict(stats, sep='/')
  old = traverse_util.flatten_dict(before['batch_stats'], sep='/')
  checked = 0
  for path in inputs[0]:
    union = np.concatenate([batch[path] for batch in inputs]).reshape(
      -1, inputs[0][path].shape[-1]
    )
    if keep(path):
      np.testing.assert_allclose(
        new[path + '/mean'], union.mean(0), rtol=1e-4, atol=1e-5
      )
      np.testing.assert_allclose(
        new[path + '/var'], union.var(0), rtol=1e-4, atol=1e-5
      )
      checked += 1
    else:
      np.testing.assert_array_equal(new[path + '/mean'], old[path + '/mean'])
      np.testing.assert_array_equal(new[path + '/var'], old[path + '/var'])
  # Stem bn1, 2 blocks x 2 in each of layers 1-3, and the downsample of layers 2 and 3.
  assert checked == record['layers'] == 15 and record['batches'] == 2
  for a, b in zip(
    jax.tree.leaves(before['params']), jax.tree.leaves(variables['params'])
  ):
    np.testing.assert_array_equal(a, b)


def test_union_moments_counts_the_spread_between_batches():
  """The union's variance, not the mean of the batches' variances."""
  x = np.random.default_rng(0).normal(size=(2, 50, 3)) + np.array(
    [[[-1.0]], [[1.0]]]
  )
  per_batch = [{'a': (b.mean(0), (b**2).mean(0))} for b in x]
  mean, var = bn_stats.union_moments(per_batch)['a']
  np.testing.assert_allclose(
    mean, x.reshape(-1, 3).mean(0), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(var, x.reshape(-1, 3).var(0), rtol=1e-5)


def test_finetune_reestimated_replaces_only_frozen_statistics_and_records_it(
  make_config, tmp_path
):
  """freeze_bn='reestimated': the frozen layers' statistics are the task's (not the
  pretext's) and then stay; their weights stay the pretext's bit for bit; run_info says so."""
  pre, fine, running = tmp_path / 'pre', tmp_path / 'fine', tmp_path / 'running'
  train.train_and_evaluate(make_config('pretext', pre, num_epochs=1))
  train.train_and_evaluate(
    make_config(
      'finetune',
      fine,
      num_epochs=2,
      init_from=str(pre),
      freeze_bn='reestimated',
    )
  )
  train.train_and_evaluate(
    make_config(
      'finetune', running, num_epochs=1, init_from=str(pre), freeze_bn='running'
    )
  )
  record = json.load(open(fine / 'run_info.json'))['bn_reestimated']
  assert record['layers'] == 15 and record['augmentation'] == 'train', record
  assert 'bn_reestimated' not in json.load(open(running / 'run_info.json'))
  load = lambda d: {
    t: traverse_util.flatten_dict(
      checkpoint_lib.load_variables(str(d))[t], sep='/'
    )
    for t in ('params', 'batch_stats')
  }
  source, tuned, kept = load(pre), load(fine), load(running)
  frozen = lambda name: not name.startswith(('layer4', 'fc'))
  for name in source['params']:
    if frozen(name):
      np.testing.assert_array_equal(
        tuned['params'][name], source['params'][name]
      )
  for name in source['batch_stats']:
    if frozen(name):
      np.testing.assert_array_equal(
        kept['batch_stats'][name], source['batch_stats'][name]
      )
      assert not np.array_equal(
        tuned['batch_stats'][name], source['batch_stats'][name]
      ), name


@pytest.mark.two_devices
@pytest.mark.parametrize('mode', ['jit', 'pmap'])
@pytest.mark.parametrize('sync_bn', [True, False])
def test_one_and_two_devices_reestimate_the_same_statistics(
  make_config, tmp_path, sync_bn, mode
):
  """The pass's moments are the global batch's (synced, or pooled per device), and each image
  is prepared alike on any number of devices: the same statistics up to summation order."""
  config = make_config(
    'finetune', tmp_path, freeze_bn='reestimated', **{'model.sync_bn': sync_bn}
  )
  dataset = input_pipeline.load_dataset(config.data)
  state, _, _, _ = run_state.create_train_state(
    config, dataset.num_classes, steps_per_epoch=2
  )
  one, record = run_state.reestimate_frozen_bn(
    config,
    state,
    dataset,
    data_parallel.DataParallel(mode, jax.local_devices()[:1]),
  )
  two, _ = run_state.reestimate_frozen_bn(
    config,
    state,
    dataset,
    data_parallel.DataParallel(mode, jax.local_devices()[:2]),
  )
  assert record['batches'] == len(dataset.train) // config.batch_size
  for a, b in zip(
    jax.tree.leaves(one.batch_stats), jax.tree.leaves(two.batch_stats)
  ):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
