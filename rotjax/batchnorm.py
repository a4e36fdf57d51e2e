"""BatchNorm with a hand-written backward pass: flax's semantics, less memory traffic.

`BatchNorm` is a drop-in for `flax.linen.BatchNorm` as models.py uses it: the same
variables (params `scale`, `bias`; batch_stats `mean`, `var`), the same statistics
(mean and E[x^2] - mean^2 in float32, averaged over `axis_name`), the same running
average update and the same output dtype. What differs is the gradient's cost.

Why: differentiated by XLA, flax's BatchNorm keeps float32 copies of every bfloat16
activation in the backward pass (the normalised input, the cotangent times the
scale, ...), each written to memory and read back. On a CPU that is memory
bandwidth: a layer1-sized BatchNorm + ReLU, forward and backward, took 13.6 ms in
flax's version and 10.1 ms in this one on the 2-core Zen 5 (scripts/benchmark.py
shows what it does to the whole step). `_backward` computes the standard closed
form, dx = scale/sigma * (g - mean(g) - xhat * mean(g * xhat)), from the saved
input in two reductions and one elementwise pass, and stores only the result, in
the input's dtype.

On the CPU, `BatchNorm` hands its training-mode work to oneDNN where it can
(rotjax/cpu/onednn_batchnorm.py: model.norm), the ReLU after it fused in.
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rotjax.cpu import onednn_batchnorm


# The collection where each BatchNorm in batch mode leaves its batch's (mean, variance).
MOMENTS = 'bn_moments'


def _reduce_axes(x):
  return tuple(range(x.ndim - 1))


def _moments(x, axis_name):
  """Batch mean and biased variance per channel, in float32, over `axis_name` too (as flax)."""
  xf = x.astype(jnp.float32)
  axes = _reduce_axes(x)
  mean, mean_sq = jnp.mean(xf, axes), jnp.mean(jnp.square(xf), axes)
  if axis_name is not None:
    mean, mean_sq = lax.pmean((mean, mean_sq), axis_name)
  return mean, jnp.maximum(mean_sq - jnp.square(mean), 0.0)


def _normalize(x, mean, inv_std, scale, bias, dtype):
  # flax's _normalize, term for term (so the forward pass matches it).
  mul = inv_std * scale
  return ((x.astype(jnp.float32) - mean) * mul + bias).astype(dtype or x.dtype)


def _forward(x, scale, bias, epsilon, axis_name, dtype):
  mean, var = _moments(x, axis_name)
  inv_std = lax.rsqrt(var + epsilon)
  y = _normalize(x, mean, inv_std, scale, bias, dtype)
  return (y, mean, var), (x, mean, inv_std, scale)


def _backward(epsilon, axis_name, dtype, residuals, cotangents):
  del epsilon, dtype
  x, mean, inv_std, scale = residuals
  g = cotangents[0].astype(
    jnp.float32
  )  # mean and var only feed the running averages
  axes = _reduce_axes(x)
  xhat = (x.astype(jnp.float32) - mean) * inv_std
  sum_g, sum_gx = jnp.sum(g, axes), jnp.sum(g * xhat, axes)
  # scale and bias get this device's share (train_step pmeans gradients); the input's
  # gradient needs the sums over every device's rows, because mean and var did.
  d_scale, d_bias = sum_gx, sum_g
  count = np.prod(x.shape[:-1])
  if axis_name is not None:
    sum_g, sum_gx = lax.psum((sum_g, sum_gx), axis_name)
    count = count * lax.psum(1, axis_name)
  dx = (g - sum_g / count - xhat * (sum_gx / count)) * (scale * inv_std)
  return dx.astype(x.dtype), d_scale, d_bias


# epsilon, axis_name and dtype are static: no gradient (axis_name is a name, not an array).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm(x, scale, bias, epsilon, axis_name=None, dtype=None):
  """(y, batch mean, batch variance) of x [..., C], y normalised with the batch statistics.

  y is in `dtype` (x's when None). The statistics carry no gradient: in a model they
  only feed the running averages.
  """
  return _forward(x, scale, bias, epsilon, axis_name, dtype)[0]


batch_norm.defvjp(_forward, _backward)


def pooled_moments(mean, var, axis_name):
  """Mean and variance of the union of every device's rows (equal row counts) from each
  device's mean and variance: the mean of E[x^2] less the squared mean of the means, so the
  spread between the devices' means counts too (the mean of the variances misses it)."""
  mean_sq = lax.pmean(var + jnp.square(mean), axis_name)
  mean = lax.pmean(mean, axis_name)
  return mean, jnp.maximum(mean_sq - jnp.square(mean), 0.0)


def _onednn_covers(axis_name) -> bool:
  """Whether oneDNN can compute statistics over `axis_name` (its own rows, or one device)."""
  return onednn_batchnorm.covers(
    1 if axis_name is None else lax.axis_size(axis_name),
    synced=axis_name is not None,
  )


class BatchNorm(nn.Module):
  """flax.linen.BatchNorm (channels last, scale and bias) with `batch_norm`'s gradient.

  `relu`: the ReLU that follows it, applied here, so that a oneDNN BatchNorm
  (`onednn`, the run's Compute.batchnorm()) can fuse it; it runs a training
  BatchNorm whose statistics are this device's own, and declines others.
  `stats_axis_name` (used when `axis_name` is None: per-device normalisation, as with
  model.sync_bn=False) pools the running statistics' update over that axis, so every
  device keeps the statistics of the global batch (pooled_moments).
  """

  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  axis_name: str | None = None
  stats_axis_name: str | None = None
  relu: bool = False
  onednn: Callable | None = None

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    running_mean = self.variable(
      'batch_stats', 'mean', lambda: jnp.zeros(features, jnp.float32)
    )
    running_var = self.variable(
      'batch_stats', 'var', lambda: jnp.ones(features, jnp.float32)
    )
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    activation = nn.relu if self.relu else (lambda y: y)
    if self.use_running_average:
      return activation(
        _normalize(
          x,
          running_mean.value,
          lax.rsqrt(running_var.value + self.epsilon),
          scale,
          bias,
          self.dtype,
        )
      )
    # Like flax, no cross-device mean while initialising (init runs outside pmap).
    axis_name = None if self.is_initializing() else self.axis_name
    fused = None
    if (
      self.onednn is not None
      and _onednn_covers(axis_name)
      and jnp.dtype(self.dtype or x.dtype) == x.dtype
    ):
      fused = self.onednn(x, scale, bias, self.epsilon, self.relu)
    if fused is not None:
      y, mean, var = fused
    else:
      y, mean, var = batch_norm(
        x, scale, bias, self.epsilon, axis_name, self.dtype
      )
      y = activation(y)
    if not self.is_initializing():
      if axis_name is None and self.stats_axis_name is not None:
        mean, var = pooled_moments(mean, var, self.stats_axis_name)
      # The batch's moments, for bn_stats.reestimate (kept only where the caller asks for
      # the MOMENTS collection: a no-op in training).
      self.sow(MOMENTS, 'moments', (mean, var))
      m = self.momentum
      running_mean.value = m * running_mean.value + (1 - m) * mean
      running_var.value = m * running_var.value + (1 - m) * var
    return y
