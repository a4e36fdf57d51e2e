import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from rotjax import batch_plans
from rotjax import freeze
from rotjax import input_pipeline
from rotjax import data_parallel
from rotjax import steps


from rotjax import run_state


def _params():
  from rotjax import models

  model = models.create_model('resnet18', num_classes=3, width=4)
  return jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3))
  )['params']


def test_mask_labels_by_subtree():
  mask = traverse_util.flatten_dict(
    freeze.trainable_mask(_params(), ('layer4', 'fc')), sep='/'
  )
  assert mask['fc/kernel'] == 'trainable'
  assert mask['layer4/1/conv2/kernel'] == 'trainable'
  assert mask['layer3/1/conv2/kernel'] == 'frozen'
  assert mask['conv1/kernel'] == 'frozen'
  assert set(freeze.frozen_prefixes(_params(), ('layer4', 'fc'))) == {
    'conv1',
    'bn1',
    'layer1',
    'layer2',
    'layer3',
  }
  assert freeze.frozen_prefixes(_params(), ('layer4/1', 'fc')) == (
    'bn1',
    'conv1',
    'layer1',
    'layer2',
    'layer3',
    'layer4/0',
  )


def test_unknown_trainable_name_is_an_error():
  with pytest.raises(ValueError, match="'layer5' matches no parameter"):
    freeze.trainable_mask(_params(), ('layer5', 'fc'))


@pytest.mark.parametrize(
  'optimizer,freeze_bn',
  [('adam', None), ('sgd', None), ('adam', 'running'), ('adam', 'reestimated')],
)
def test_frozen_params_stay_bit_identical_and_bn_statistics_follow_freeze_bn(
  make_config, tmp_path, optimizer, freeze_bn
):
  """Frozen params never move. Frozen BatchNorm statistics keep updating by default (the
  reports' PyTorch: frozen layers in .train() mode) and stay put with freeze_bn='running' or
  'reestimated' (whose one pass before training is train_and_evaluate's, bn_stats_test.py)."""
  config = make_config('finetune', tmp_path, **{'optim.name': optimizer})
  if freeze_bn is None:
    assert config.freeze_bn == 'batch'
  else:
    config.freeze_bn = freeze_bn
  dataset = input_pipeline.load_dataset(config.data)
  state, mask, _, _ = run_state.create_train_state(
    config, dataset.num_classes, steps_per_epoch=4
  )
  before = jax.device_get(state)
  dp = data_parallel.DataParallel('auto', jax.local_devices()[:1])
  step = steps.compiled_train_step(config, mask, dp, smoothing=0.1)
  state, rng = dp.put(state), dp.put(jax.random.key(0))
  for epoch in range(2):
    for batch in batch_plans.train_batches(dataset.train, 8, 0, epoch):
      state, _ = step(state, dp.put_batch(batch), rng)
  after = dp.get(state)
  flat_mask = traverse_util.flatten_dict(mask, sep='/')
  for tree in ('params', 'batch_stats'):
    old = traverse_util.flatten_dict(getattr(before, tree), sep='/')
    new = traverse_util.flatten_dict(getattr(after, tree), sep='/')
    for name in old:
      top = name.split('/')[0]
      trainable = top in ('layer4', 'fc')
      if tree == 'params':
        assert (flat_mask[name] == 'trainable') == trainable
      moves = trainable or (
        tree == 'batch_stats' and config.freeze_bn == 'batch'
      )
      if moves:
        assert not np.array_equal(old[name], new[name]), (
          f'{tree}/{name} did not move'
        )
      else:
        np.testing.assert_array_equal(
          old[name], new[name], err_msg=f'{tree}/{name} moved'
        )


def test_frozen_bn_normalises_with_batch_statistics_by_default(
  make_config, tmp_path
):
  """Stage 3 from random init: the running statistics are mean 0 / variance 1, so only
  freeze_bn='batch' normalises a frozen layer's output (per channel mean ~0, variance ~1)."""
  # Per-device statistics, on one device: the running statistics' update is pooled over the
  # devices ('data'), so the model runs under a pmap of one.
  config = make_config('finetune', tmp_path, **{'model.sync_bn': False})
  dataset = input_pipeline.load_dataset(config.data)
  images = jnp.asarray(dataset.train.images[:16], jnp.float32) / 255.0
  moments = {}
  for freeze_bn in ('batch', 'running'):
    config.freeze_bn = freeze_bn
    state, _, _, _ = run_state.create_train_state(
      config, dataset.num_classes, steps_per_epoch=4
    )
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    # layer1's first bn2 (no ReLU of its own: the stem's bn1 applies one, on oneDNN fused
    # into it), captured from the frozen BatchNorm module itself.
    apply = jax.pmap(
      lambda v, x: state.apply_fn(
        v,
        x,
        train=True,
        mutable=['batch_stats', 'intermediates'],
        capture_intermediates=lambda m, _: m.path == ('layer1', '0', 'bn2'),
      )[1],
      axis_name='data',
      devices=jax.local_devices()[:1],
    )
    inter = apply(jax.tree.map(lambda x: x[None], variables), images[None])
    out = np.asarray(
      inter['intermediates']['layer1']['0']['bn2']['__call__'][0][0]
    )
    moments[freeze_bn] = (
      np.abs(out.mean((0, 1, 2))).max(),
      out.var((0, 1, 2)).mean(),
    )
  assert moments['batch'][0] < 1e-3 and abs(moments['batch'][1] - 1) < 0.05, (
    moments
  )
  assert moments['running'][0] > 0.05, (
    moments
  )  # the raw conv output: not centred
