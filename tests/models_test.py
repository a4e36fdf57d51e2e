import jax
import jax.numpy as jnp
import pytest

from rotjax import models
from rotjax.compute import Compute


def _count(name, **kw):
  model = models.create_model(name, **kw)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  )
  return sum(x.size for x in jax.tree.leaves(shapes['params'])), shapes[
    'params'
  ]


@pytest.mark.parametrize(
  'name,expected',
  [
    ('resnet18', 11_173_962),
    ('resnet34', 21_282_122),
    ('resnet50', 23_520_842),
  ],
)
def test_parameter_counts_match_torchvision_cifar_variants(name, expected):
  count, _ = _count(name, num_classes=10)
  assert count == expected


def test_torchvision_names():
  _, params = _count('resnet18', num_classes=10)
  assert set(params) == {
    'conv1',
    'bn1',
    'layer1',
    'layer2',
    'layer3',
    'layer4',
    'fc',
  }
  assert set(params['layer1']) == {'0', '1'}
  assert 'downsample_conv' in params['layer2']['0']
  assert params['fc']['kernel'].shape == (512, 10)


def test_forward_shapes_and_features():
  model = models.create_model(
    'resnet18', num_classes=4, width=4, stem='imagenet'
  )
  x = jnp.zeros((2, 64, 64, 3))
  variables = model.init(jax.random.key(0), x)
  logits, feats = model.apply(variables, x)
  assert logits.shape == (2, 4)
  assert feats['layer1'].shape == (2, 16, 16, 4)
  assert feats['layer4'].shape == (2, 2, 2, 32)
  assert feats['pooled'].shape == (2, 32)


def test_width_option_shrinks_model():
  small, _ = _count('resnet18', num_classes=10, width=16)
  assert small < 11_173_962 / 10


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="model.name='resnet19'"):
    models.create_model('resnet19')
  model = models.create_model('resnet18', width=4)
  with pytest.raises(ValueError, match=r'\[batch, height, width, 3\]'):
    model.init(jax.random.key(0), jnp.zeros((1, 32, 32)))


@pytest.mark.gpu
def test_bfloat16_compute_keeps_float32_params_and_statistics():
  model = models.create_model(
    'resnet18', num_classes=4, width=4, compute=Compute(dtype='bfloat16')
  )
  x = jnp.ones((2, 16, 16, 3))
  variables = model.init(jax.random.key(0), x)
  (logits, feats), updates = model.apply(
    variables, x, train=True, mutable=['batch_stats']
  )
  assert feats['layer4'].dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  for leaf in jax.tree.leaves(variables['params']) + jax.tree.leaves(
    updates['batch_stats']
  ):
    assert leaf.dtype == jnp.float32
