import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from rotjax import freeze
from rotjax import input_pipeline
from rotjax import parallel
from rotjax import train


def _params():
  from rotjax import models
  model = models.create_model('resnet18', num_classes=3, width=4)
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']


def test_mask_labels_by_subtree():
  mask = traverse_util.flatten_dict(freeze.trainable_mask(_params(), ('layer4', 'fc')), sep='/')
  assert mask['fc/kernel'] == 'trainable'
  assert mask['layer4/1/conv2/kernel'] == 'trainable'
  assert mask['layer3/1/conv2/kernel'] == 'frozen'
  assert mask['conv1/kernel'] == 'frozen'
  assert set(freeze.frozen_prefixes(_params(), ('layer4', 'fc'))) == {
      'conv1', 'bn1', 'layer1', 'layer2', 'layer3'}
  assert freeze.frozen_prefixes(_params(), ('layer4/1', 'fc')) == (
      'bn1', 'conv1', 'layer1', 'layer2', 'layer3', 'layer4/0')


def test_unknown_trainable_name_is_an_error():
  with pytest.raises(ValueError, match="'layer5' matches no parameter"):
    freeze.trainable_mask(_params(), ('layer5', 'fc'))


@pytest.mark.parametrize('optimizer', ['adam', 'sgd'])
def test_frozen_leaves_stay_bit_identical(make_config, tmp_path, optimizer):
  config = make_config('finetune', tmp_path, **{'optim.name': optimizer})
  dataset = input_pipeline.load_dataset(config.data)
  state, mask, _, _ = train.create_train_state(config, dataset.num_classes, steps_per_epoch=4)
  before = jax.device_get(state)
  devices = jax.local_devices()[:1]
  step = jax.pmap(functools.partial(train.train_step, prepare_fn=train.make_prepare_fn(config, train=True),
                                    mask=mask, smoothing=0.1), axis_name='batch', devices=devices)
  state = parallel.replicate(state, devices)
  rng = parallel.replicate(jax.random.key(0), devices)
  for epoch in range(2):
    for batch in input_pipeline.train_batches(dataset.train, 8, 0, epoch):
      state, _ = step(state, input_pipeline.shard(batch, 1), rng)
  after = jax.device_get(parallel.unreplicate(state))
  flat_mask = traverse_util.flatten_dict(mask, sep='/')
  for tree in ('params', 'batch_stats'):
    old = traverse_util.flatten_dict(getattr(before, tree), sep='/')
    new = traverse_util.flatten_dict(getattr(after, tree), sep='/')
    for name in old:
      top = name.split('/')[0]
      trainable = top in ('layer4', 'fc')
      if tree == 'params':
        assert (flat_mask[name] == 'trainable') == trainable
      if trainable:
        assert not np.array_equal(old[name], new[name]), f'{tree}/{name} did not train'
      else:
        np.testing.assert_array_equal(old[name], new[name], err_msg=f'{tree}/{name} moved')
