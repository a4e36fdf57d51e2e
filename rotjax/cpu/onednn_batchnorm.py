"""Training-mode BatchNorm (and the ReLU after it) on the CPU through oneDNN, as XLA FFI
custom calls with a custom VJP.

Why: XLA's CPU code runs a bfloat16 BatchNorm as several passes over its activation (a
float32 copy for the statistics' reductions, the normalisation, the ReLU; in the backward
pass float32 copies of the masked gradient and of x-hat for two more reductions), so
BatchNorm + ReLU took about a quarter of the bf16 train step on the Zen 5 (165 of 685 ms,
profiled), the convolutions being the same oneDNN kernels PyTorch runs. oneDNN's
batch_normalization reads the activation twice forward and twice
backward, the ReLU fused in (its mask kept as a bit per element): a layer1-sized bf16
BatchNorm + ReLU, forward and backward, 10.3 ms in XLA against 2.3 ms here.

What it computes is rotjax.batchnorm's batch mode: the batch mean and biased variance in
float32 (oneDNN subtracts the mean before squaring: the same statistics, fewer rounding
errors than flax's E[x^2] - mean^2), the output in the input's dtype, and the gradients of
input, scale and bias. It covers one device's rows: BatchNorms whose statistics are
averaged across devices (model.sync_bn with several devices) stay in XLA, where the
cross-device sums are (`covers`). `model.norm` is decided once per run by rotjax/compute.py
(`require` says whether oneDNN runs a dtype here); batchnorm.BatchNorm then decides per call
(`apply` returns None for a BatchNorm oneDNN does not take).
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from rotjax.cpu import onednn_build
from rotjax.cpu.onednn_build import Status
from rotjax.cpu.onednn_errors import OneDNNNormError

HINT = "set model.norm=xla to use XLA's BatchNorm instead"
_PROBE_SHAPE = (4, 8, 8, 16)
_fallbacks_logged = set()


def _call(target, out_types, *args, relu, epsilon):
  return jax.ffi.ffi_call(onednn_build.TARGETS[target], out_types)(
    *args, relu=np.int64(relu), epsilon=np.float32(epsilon)
  )


# epsilon, relu and the workspace's size are static (they pick the oneDNN primitive).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm(x, scale, bias, epsilon, relu, workspace_bytes):
  """(y, batch mean, batch variance) of NHWC x; y = relu(x-hat * scale + bias) if `relu`.

  scale and bias float32 [C]. The statistics carry no gradient (they only feed the
  running averages), as in rotjax.batchnorm.batch_norm.
  """
  return _forward(x, scale, bias, epsilon, relu, workspace_bytes)[0]


def _forward(x, scale, bias, epsilon, relu, workspace_bytes):
  vector = jax.ShapeDtypeStruct(x.shape[-1:], jnp.float32)
  # Without the ReLU there is no mask; oneDNN is then not given this 1-byte placeholder.
  workspace = jax.ShapeDtypeStruct((max(workspace_bytes, 1),), jnp.uint8)
  y, mean, var, mask = _call(
    'batchnorm_forward',
    (jax.ShapeDtypeStruct(x.shape, x.dtype), vector, vector, workspace),
    x,
    scale,
    bias,
    relu=relu,
    epsilon=epsilon,
  )
  return (y, mean, var), (x, mean, var, scale, bias, mask)


def _backward(epsilon, relu, workspace_bytes, residuals, cotangents):
  del workspace_bytes
  x, mean, var, scale, bias, mask = residuals
  vector = jax.ShapeDtypeStruct(x.shape[-1:], jnp.float32)
  dx, d_scale, d_bias = _call(
    'batchnorm_backward',
    (jax.ShapeDtypeStruct(x.shape, x.dtype), vector, vector),
    x,
    cotangents[0].astype(x.dtype),
    mean,
    var,
    scale,
    bias,
    mask,
    relu=relu,
    epsilon=epsilon,
  )
  return dx, d_scale, d_bias


batch_norm.defvjp(_forward, _backward)


def apply(x, scale, bias, epsilon, relu, strict=False):
  """(y, mean, var) of `batch_norm` where oneDNN has optimized kernels for this BatchNorm,
  else None (the caller runs XLA's); `strict` (model.norm=onednn): an OneDNNNormError."""
  dtype = x.dtype.name
  if x.ndim != 4 or dtype not in onednn_build.DTYPE_CODES:
    status, info, workspace = (
      Status.UNAVAILABLE,
      'only 4-D float32/bfloat16 inputs',
      0,
    )
  else:
    status, info, workspace = onednn_build.prepare_batchnorm(
      x.shape, dtype, relu, epsilon
    )
  if status == Status.OPTIMIZED:
    return batch_norm(
      x,
      scale.astype(jnp.float32),
      bias.astype(jnp.float32),
      float(epsilon),
      bool(relu),
      workspace,
    )
  why = onednn_build.declined(status, info)
  if strict:
    raise OneDNNNormError(
      f'model.norm=onednn: a {dtype} BatchNorm of input {tuple(x.shape)}: '
      f'{why}; {HINT}'
    )
  if (dtype, status) not in _fallbacks_logged:
    _fallbacks_logged.add((dtype, status))
    logging.warning(
      'A %s BatchNorm (input %s) runs on XLA: %s', dtype, tuple(x.shape), why
    )
  return None


def covers(num_devices: int, synced: bool) -> bool:
  """Whether oneDNN computes a training BatchNorm's statistics: over one device's rows only
  (the kernel has no cross-device sums), so not where they are synced over several devices.
  The one statement of that rule: compute.resolve records it for a run, batchnorm.BatchNorm
  applies it per call (a re-estimation's synced BatchNorm, a test's own pmap)."""
  return not synced or num_devices == 1


def require(dtype) -> str:
  """Why oneDNN runs training BatchNorms of `dtype` here (model.norm=onednn); an
  OneDNNNormError naming why it cannot. compute.resolve is its one caller."""
  dtype = np.dtype(dtype).name
  backend = jax.default_backend()
  if backend != 'cpu':
    raise OneDNNNormError(
      f"model.norm=onednn runs only on the CPU; this run's backend is "
      f'{backend}: use model.norm=auto or xla'
    )
  if not onednn_build.load():
    raise OneDNNNormError(
      f'model.norm=onednn, but the oneDNN kernels are unavailable: '
      f'{onednn_build.unavailable_reason()}; {HINT}'
    )
  status, info, _ = onednn_build.prepare_batchnorm(
    _PROBE_SHAPE, dtype, True, 1e-5
  )
  if status != Status.OPTIMIZED:
    raise OneDNNNormError(
      f'model.norm=onednn, but oneDNN {onednn_build.version()} has no '
      f'optimized {dtype} BatchNorm on this CPU ({info}); {HINT} or another '
      'model.dtype'
    )
  return f'oneDNN {onednn_build.version()} {dtype} BatchNorm ({info})'


apply_strict = functools.partial(apply, strict=True)
