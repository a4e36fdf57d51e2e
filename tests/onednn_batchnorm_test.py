"""oneDNN BatchNorm (+ ReLU): the same statistics, outputs and gradients as rotjax.batchnorm's
XLA path, taken where it should be, declined (or named) where it cannot run."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rotjax import batchnorm, models
from rotjax.compute import Compute
from rotjax.cpu import onednn_batchnorm, onednn_build, onednn_errors
from rotjax.cpu.onednn_build import Status

pytestmark = pytest.mark.cpu_only('oneDNN BatchNorm, a CPU-only path')

needs_onednn = pytest.mark.skipif(
  (not onednn_build.installations() or onednn_build.disabled())
  and os.environ.get('ROTJAX_REQUIRE_ONEDNN') != '1',
  reason='no oneDNN installed (pip install onednn-devel-cpu-gomp) or ROTJAX_ONEDNN=0',
)
EPS = 1e-5


def _skip_unless_onednn_takes(shape, dtype, relu):
  onednn_build.load()
  status, info, _ = onednn_build.prepare_batchnorm(
    shape, jnp.dtype(dtype).name, relu, EPS
  )
  if status != Status.OPTIMIZED:
    pytest.skip(f'oneDNN has no optimized BatchNorm for this here: {info}')


def _xla(x, scale, bias, relu):
  y, mean, var = batchnorm.batch_norm(x, scale, bias, EPS, None, x.dtype)
  return (nn.relu(y) if relu else y), mean, var


def _ours(x, scale, bias, relu):
  # strict: oneDNN or an error, never a silent XLA that would compare XLA with XLA.
  return onednn_batchnorm.apply(x, scale, bias, EPS, relu, strict=True)


@needs_onednn
@pytest.mark.parametrize(
  'dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)]
)
@pytest.mark.parametrize('relu', [True, False])
@pytest.mark.parametrize('shape', [(8, 6, 6, 5), (4, 4, 4, 64)])
def test_values_statistics_and_gradients_match_xla(shape, relu, dtype, tol):
  _skip_unless_onednn_takes(shape, dtype, relu)
  rng = np.random.default_rng(0)
  # Off-centre and scaled, so that mean and variance both matter.
  x = jnp.asarray(3.0 + 2.0 * rng.standard_normal(shape), dtype)
  scale = jnp.linspace(0.5, 2.0, shape[-1])
  bias = jnp.linspace(-1.0, 1.0, shape[-1])
  cotangent = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  results = []
  for bn in (_xla, _ours):
    outputs = jax.jit(bn, static_argnums=3)(x, scale, bias, relu)
    loss = lambda x, s, b: jnp.sum(
      bn(x, s, b, relu)[0].astype(jnp.float32) * cotangent
    )
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, scale, bias)
    results.append((*outputs, *grads))
  for name, a, b in zip(
    ('y', 'mean', 'var', 'dx', 'd_scale', 'd_bias'), *results
  ):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    scale_ = np.abs(a).max() + 1e-6
    assert np.abs(a - b).max() <= tol * scale_, (
      name,
      np.abs(a - b).max(),
      scale_,
    )
  if relu:  # the fused ReLU really zeroes: the output's negatives are gone
    assert float(jnp.min(results[1][0].astype(jnp.float32))) == 0.0


@needs_onednn
def test_statistics_as_accurate_as_float64_allows():
  """oneDNN subtracts the mean before squaring: where the mean dwarfs the spread (a deep
  1x1 map over a few rows), its variance and output stay at float32 rounding of the float64
  answer, where E[x^2] - mean^2 (flax's, the XLA path's) loses digits."""
  x = jnp.asarray(
    3.0 + 0.01 * np.random.default_rng(0).standard_normal((4, 1, 1, 64)),
    jnp.float32,
  )
  x64 = np.asarray(x, np.float64)
  var64 = x64.var((0, 1, 2))
  y64 = (x64 - x64.mean((0, 1, 2))) / np.sqrt(var64 + EPS)
  y, _, var = _ours(x, jnp.ones(64), jnp.zeros(64), False)
  np.testing.assert_allclose(var, var64, rtol=1e-4)
  assert np.abs(np.asarray(y, np.float64) - y64).max() < 1e-3
  y_xla = _xla(x, jnp.ones(64), jnp.zeros(64), False)[0]
  assert (
    np.abs(np.asarray(y_xla, np.float64) - y64).max() > 1e-2
  )  # what it improves on


@needs_onednn
@pytest.mark.parametrize(
  'name,stem', [('resnet18', 'cifar'), ('resnet50', 'imagenet')]
)
def test_resnet_trains_on_onednn_batchnorm_as_on_xla(name, stem):
  """A ResNet's train-mode loss, gradients and new running statistics: oneDNN's BatchNorms
  (model.norm=onednn) against XLA's, convolutions on XLA in both (so only BatchNorm differs);
  the basic and the bottleneck block, both stems."""
  kw = dict(num_classes=5, width=8, stem=stem)
  # Enough rows per channel in the last layers (ImageNet stem: 1x1 maps there): over a few
  # rows XLA's E[x^2] - mean^2 cancels (test_statistics_as_accurate_as_float64_allows).
  size = 16 if stem == 'cifar' else 64
  x = jnp.asarray(
    np.random.default_rng(1).standard_normal((8, size, size, 3)), jnp.float32
  )
  a, b = (
    models.create_model(
      name, compute=Compute(norm=norm, norm_strict=True), **kw
    )
    for norm in ('xla', 'onednn')
  )
  variables = a.init(jax.random.key(0), x)

  def loss(model, params):
    (logits, _), updates = model.apply(
      {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
    )
    return jnp.sum(jnp.sin(logits)), updates['batch_stats']

  step = lambda m: jax.jit(
    jax.value_and_grad(lambda p: loss(m, p), has_aux=True)
  )
  assert (
    'RotjaxBatchNormForward' in step(b).lower(variables['params']).as_text()
  )
  assert 'RotjaxBatchNorm' not in step(a).lower(variables['params']).as_text()
  (la, sa), ga = step(a)(variables['params'])
  (lb, sb), gb = step(b)(variables['params'])
  np.testing.assert_allclose(la, lb, rtol=1e-4, atol=1e-4)
  for u, v in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
    np.testing.assert_allclose(u, v, rtol=2e-3, atol=2e-4)
  # Each gradient within `tol` of its largest entry. ResNet50's gradients at this toy size
  # move by ~3% with any change in rounding (XLA's own BatchNorm with a two-pass variance
  # moved them as far), so its bound only catches a wrong gradient (a lost ReLU mask, a
  # missing term: order 1), not rounding.
  tol = 2e-3 if name == 'resnet18' else 0.1
  for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    assert np.abs(u - v).max() <= tol * np.abs(u).max(), (
      u.shape,
      np.abs(u - v).max(),
    )
  # Eval mode (running statistics) never calls oneDNN's training BatchNorm.
  assert 'RotjaxBatchNorm' not in jax.jit(b.apply).lower(variables, x).as_text()


@needs_onednn
def test_statistics_synced_over_devices_stay_on_xla():
  """With statistics over several devices' rows (model.sync_bn), BatchNorm needs XLA's
  cross-device sums: oneDNN is not called; over a single device it is."""
  module = batchnorm.BatchNorm(
    axis_name='d', relu=True, onednn=onednn_batchnorm.apply
  )
  x = jnp.asarray(
    np.random.default_rng(0).standard_normal((2, 4, 4, 4, 8)), jnp.float32
  )
  variables = module.init(jax.random.key(0), x[0])
  apply = lambda x: module.apply(variables, x, mutable=['batch_stats'])[0]
  n = jax.local_device_count()
  for devices in {1, n}:
    text = (
      jax.pmap(apply, axis_name='d', devices=jax.local_devices()[:devices])
      .lower(x[:devices])
      .as_text()
    )
    assert ('RotjaxBatchNormForward' in text) == (devices == 1), devices


def test_a_failure_inside_a_step_is_named():
  with pytest.raises(onednn_errors.OneDNNNormError, match='input NHWC'):
    with onednn_errors.named_errors():
      raise jax.errors.JaxRuntimeError(
        'INTERNAL: rotjax oneDNN batch norm: batch norm, input '
        'NHWC [8, 2, 2, 32], dtype float32: could not execute'
      )


@needs_onednn
def test_a_batchnorm_onednn_cannot_take_is_named_or_left_to_xla():
  x = jnp.ones(
    (2, 4, 4, 8), jnp.float16
  )  # oneDNN's BatchNorm here: float32 and bfloat16
  scale = bias = jnp.ones(8)
  assert onednn_batchnorm.apply(x, scale, bias, EPS, True) is None
  with pytest.raises(
    onednn_errors.OneDNNNormError,
    match=r'float16 BatchNorm of input \(2, 4, 4, 8\)',
  ):
    onednn_batchnorm.apply(x, scale, bias, EPS, True, strict=True)
