"""rotjax.batchnorm against flax.linen.BatchNorm: same outputs, statistics and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rotjax import batchnorm

SETTINGS = dict(momentum=0.9, epsilon=1e-5)


def _loss_and_grads(module, variables, x, cotangent, use_running_average):
  """Loss sum(relu(bn(x)) * cotangent), its gradients (params, x) and the new batch_stats."""

  def loss(params, x):
    y, updates = module.apply(
      {'params': params, 'batch_stats': variables['batch_stats']},
      x,
      mutable=['batch_stats'],
    )
    return jnp.sum(nn.relu(y).astype(jnp.float32) * cotangent), (
      y,
      updates['batch_stats'],
    )

  (value, (y, stats)), grads = jax.value_and_grad(
    loss, argnums=(0, 1), has_aux=True
  )(variables['params'], x)
  return y, stats, grads


def _pair(dtype, use_running_average=False, axis_name=None):
  kw = dict(
    SETTINGS,
    dtype=dtype,
    use_running_average=use_running_average,
    axis_name=axis_name,
  )
  return nn.BatchNorm(**kw), batchnorm.BatchNorm(**kw)


def _inputs(dtype, shape=(8, 6, 6, 5)):
  # Off-centre, scaled input so that mean and variance both matter.
  x = (3.0 + 2.0 * jax.random.normal(jax.random.key(0), shape)).astype(dtype)
  cotangent = jax.random.normal(jax.random.key(1), shape)
  return x, cotangent


def _variables(module, x):
  variables = module.init(jax.random.key(0), x)
  # Non-trivial scale, bias and running statistics.
  c = x.shape[-1]
  params = {
    'scale': jnp.linspace(0.5, 2.0, c),
    'bias': jnp.linspace(-1.0, 1.0, c),
  }
  stats = {'mean': jnp.linspace(2.0, 4.0, c), 'var': jnp.linspace(1.0, 5.0, c)}
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
    jnp.shape, {'params': params, 'batch_stats': stats}
  )
  return {'params': params, 'batch_stats': stats}


def _assert_close(a, b, rtol, atol):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(
      np.asarray(u, np.float32), np.asarray(v, np.float32), rtol=rtol, atol=atol
    )


def test_same_variables_as_flax():
  theirs, ours = _pair(jnp.float32)
  x, _ = _inputs(jnp.float32)
  shapes = lambda m: jax.tree.map(
    lambda a: (a.shape, a.dtype), m.init(jax.random.key(0), x)
  )
  assert shapes(theirs) == shapes(ours)


@pytest.mark.parametrize('use_running_average', [False, True])
def test_matches_flax_float32(use_running_average):
  theirs, ours = _pair(jnp.float32, use_running_average)
  x, cotangent = _inputs(jnp.float32)
  variables = _variables(theirs, x)
  want = _loss_and_grads(theirs, variables, x, cotangent, use_running_average)
  got = _loss_and_grads(ours, variables, x, cotangent, use_running_average)
  _assert_close(got, want, rtol=1e-5, atol=1e-5)
  # The test has teeth: training mode moved the running statistics, eval mode did not.
  moved = not np.allclose(got[1]['mean'], variables['batch_stats']['mean'])
  assert moved != use_running_average


@pytest.mark.gpu
def test_matches_flax_bfloat16():
  theirs, ours = _pair(jnp.bfloat16)
  x, cotangent = _inputs(jnp.bfloat16, (16, 8, 8, 6))
  variables = _variables(theirs, x)
  y_want, stats_want, grads_want = _loss_and_grads(
    theirs, variables, x, cotangent, False
  )
  y_got, stats_got, grads_got = _loss_and_grads(
    ours, variables, x, cotangent, False
  )
  assert y_got.dtype == y_want.dtype == jnp.bfloat16
  assert grads_got[1].dtype == jnp.bfloat16
  _assert_close(
    stats_got, stats_want, rtol=1e-6, atol=1e-6
  )  # statistics: float32, same math
  _assert_close(
    y_got, y_want, rtol=1e-2, atol=1e-2
  )  # one bf16 rounding apart at most
  # Gradients: flax keeps float32 intermediates, this rounds once to bf16 at the end.
  _assert_close(grads_got[0], grads_want[0], rtol=2e-2, atol=5e-2)
  scale = float(jnp.max(jnp.abs(grads_want[1].astype(jnp.float32))))
  _assert_close(grads_got[1], grads_want[1], rtol=0, atol=2e-2 * scale)


def test_synced_over_devices_matches_flax_and_one_big_batch():
  """Under pmap with axis_name, statistics and the input's gradient span every device's rows."""
  n = jax.local_device_count()
  if n < 2:
    pytest.skip('needs 2 host devices (tests/conftest.py sets them)')
  n = 2
  x, cotangent = _inputs(jnp.float32, (8, 4, 4, 3))
  results = {}
  for name, module in zip(
    ('flax', 'rotjax'), _pair(jnp.float32, axis_name='batch')
  ):
    variables = _variables(module, x)

    def per_device(x, cotangent, module=module, variables=variables):
      y, stats, (d_params, dx) = _loss_and_grads(
        module, variables, x, cotangent, False
      )
      return y, stats, jax.lax.pmean(d_params, 'batch'), dx

    shard = lambda a: a.reshape(n, -1, *a.shape[1:])
    results[name] = jax.pmap(
      per_device, axis_name='batch', devices=jax.local_devices()[:n]
    )(shard(x), shard(cotangent))
  _assert_close(results['rotjax'], results['flax'], rtol=1e-5, atol=1e-5)
  # And the same as one device normalising all rows: gradients summed over devices
  # equal the single-batch gradient.
  _, ours = _pair(jnp.float32)
  variables = _variables(ours, x)
  y, stats, (d_params, dx) = _loss_and_grads(
    ours, variables, x, cotangent, False
  )
  y_dev, stats_dev, d_params_dev, dx_dev = results['rotjax']
  _assert_close(y_dev.reshape(y.shape), y, rtol=1e-5, atol=1e-5)
  _assert_close(
    jax.tree.map(lambda a: a[0], stats_dev), stats, rtol=1e-5, atol=1e-5
  )
  _assert_close(
    jax.tree.map(lambda a: a[0] * n, d_params_dev),
    d_params,
    rtol=1e-5,
    atol=1e-4,
  )
  _assert_close(dx_dev.reshape(dx.shape), dx, rtol=1e-5, atol=1e-5)


def test_gradient_matches_finite_differences():
  _, ours = _pair(jnp.float32)
  x, cotangent = _inputs(jnp.float32, (6, 3, 3, 2))
  x = x.astype(jnp.float64) if jax.config.jax_enable_x64 else x
  variables = _variables(ours, x)
  f = lambda x: _loss_and_grads(ours, variables, x, cotangent, False)[2][1]
  loss = lambda x: jnp.sum(
    nn.relu(ours.apply(variables, x, mutable=['batch_stats'])[0]) * cotangent
  )
  direction = jax.random.normal(jax.random.key(2), x.shape)
  eps = 1e-2
  numeric = (loss(x + eps * direction) - loss(x - eps * direction)) / (2 * eps)
  analytic = jnp.sum(f(x) * direction)
  np.testing.assert_allclose(
    float(analytic), float(numeric), rtol=2e-2, atol=2e-2
  )
