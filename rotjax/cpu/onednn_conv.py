"""Convolutions on the CPU through oneDNN, as XLA FFI custom calls with a custom VJP.

Why: XLA's CPU backend runs a bfloat16 convolution as a float32 Eigen convolution
with converts around it, so bf16 gives the convolutions (nearly all of a ResNet's
FLOPs) nothing on CPU. oneDNN has native bf16 kernels (AVX512-BF16, AMX) and is
what PyTorch's CPU convolutions run on. `conv_general_dilated` below is a drop-in
for `lax.conv_general_dilated` that Flax's `nn.Conv` takes as an argument; it
sends the plain 2-D NHWC/HWIO case to oneDNN and everything else to XLA.

Whether oneDNN runs a run's convolutions is decided once per run by rotjax/compute.py,
which asks `uses_onednn`; the model then hands `conv_general_dilated` (or its strict
variant) to nn.Conv. Each convolution is prepared while the model is traced
(onednn_build.prepare): one oneDNN cannot take, or takes only with its slow reference
kernels, goes to XLA under 'auto' and is an `OneDNNConvError` under 'onednn'. Finding,
compiling and loading oneDNN is onednn_build.py's job.
"""

import functools
import logging

import jax
import numpy as np
from jax import lax

from rotjax.cpu import onednn_build
from rotjax.cpu.onednn_build import Status
from rotjax.cpu.onednn_errors import OneDNNConvError

HINT = "set model.conv=xla to use XLA's convolutions instead"
_NHWC = lax.ConvDimensionNumbers(
  lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2)
)
_fallbacks_logged = set()


def _attrs(strides, padding):
  (pt, pb), (pl, pr) = padding
  return dict(
    stride_h=np.int64(strides[0]),
    stride_w=np.int64(strides[1]),
    pad_top=np.int64(pt),
    pad_bottom=np.int64(pb),
    pad_left=np.int64(pl),
    pad_right=np.int64(pr),
  )


def _call(kind, out_shape, out_dtype, a, b, strides, padding):
  return jax.ffi.ffi_call(
    onednn_build.TARGETS[kind], jax.ShapeDtypeStruct(out_shape, out_dtype)
  )(a, b, **_attrs(strides, padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x, w, strides, padding, xla_dw=False):
  """NHWC x HWIO -> NHWC, no dilation or groups; strides (h, w), padding ((t, b), (l, r)).

  xla_dw: the weight gradient by XLA's convolution, for shapes whose oneDNN
  backward-weights kernel is passed over (Status.NO_WEIGHT_GRADIENT).
  """
  out_hw = onednn_build.out_hw(x.shape, w.shape, strides, padding)
  return _call(
    'forward',
    (x.shape[0], *out_hw, w.shape[3]),
    x.dtype,
    x,
    w,
    strides,
    padding,
  )


def _conv2d_fwd(x, w, strides, padding, xla_dw):
  return conv2d(x, w, strides, padding, xla_dw), (x, w)


def _conv2d_bwd(strides, padding, xla_dw, residuals, dy):
  x, w = residuals
  dy = dy.astype(x.dtype)
  dx = _call('backward_data', x.shape, x.dtype, dy, w, strides, padding)
  if xla_dw:
    _, pullback = jax.vjp(
      lambda w_: lax.conv_general_dilated(
        x, w_, strides, padding, dimension_numbers=_NHWC
      ),
      w,
    )
    (dw,) = pullback(dy)
  else:
    dw = _call('backward_weights', w.shape, w.dtype, x, dy, strides, padding)
  return dx, dw


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def _supported(
  lhs,
  rhs,
  padding,
  lhs_dilation,
  rhs_dilation,
  dimension_numbers,
  feature_group_count,
) -> bool:
  plain = lambda d: d is None or all(v == 1 for v in d)
  return (
    lhs.ndim == 4
    and lhs.dtype == rhs.dtype
    and lhs.dtype.name in ('float32', 'bfloat16')
    and not isinstance(padding, str)
    and plain(lhs_dilation)
    and plain(rhs_dilation)
    and feature_group_count == 1
    and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    == _NHWC
  )


def _takes(lhs, rhs, strides, padding, strict: bool) -> Status | None:
  """The Status of this convolution where oneDNN runs it (OPTIMIZED or NO_WEIGHT_GRADIENT),
  else None: XLA's (under model.conv=onednn, `strict`, an error naming the convolution)."""
  dtype = lhs.dtype.name
  status, info = onednn_build.prepare(
    onednn_build.geometry(lhs.shape, rhs.shape, strides, padding), dtype
  )
  if status in (Status.OPTIMIZED, Status.NO_WEIGHT_GRADIENT):
    return status
  why = onednn_build.declined(status, info)
  if strict:
    raise OneDNNConvError(
      f'model.conv=onednn: a {dtype} convolution of input {tuple(lhs.shape)} '
      f'and kernel {tuple(rhs.shape)}: {why}; {HINT}'
    )
  if (dtype, status) not in _fallbacks_logged:
    _fallbacks_logged.add((dtype, status))
    logging.warning(
      'A %s convolution (input %s, kernel %s) runs on XLA: %s',
      dtype,
      tuple(lhs.shape),
      tuple(rhs.shape),
      why,
    )
  return None


def conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  precision=None,
  strict=False,
  **kwargs,
):
  """`lax.conv_general_dilated` with the plain 2-D NHWC case on oneDNN (see module doc)."""
  if (
    not kwargs
    and onednn_build.load()
    and _supported(
      lhs,
      rhs,
      padding,
      lhs_dilation,
      rhs_dilation,
      dimension_numbers,
      feature_group_count,
    )
  ):
    strides, pads = tuple(window_strides), tuple(tuple(p) for p in padding)
    status = _takes(lhs, rhs, strides, pads, strict)
    if status is not None:
      return conv2d(
        lhs, rhs, strides, pads, status == Status.NO_WEIGHT_GRADIENT
      )
  return lax.conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation,
    rhs_dilation,
    dimension_numbers,
    feature_group_count,
    precision=precision,
    **kwargs,
  )


conv_general_dilated_strict = functools.partial(
  conv_general_dilated, strict=True
)


def uses_onednn(impl: str, dtype) -> tuple:
  """(whether `model.conv=impl` runs `dtype` convolutions on oneDNN here, why).

  'auto': oneDNN when JAX's default backend is the CPU, the kernels load, and oneDNN has
  optimized kernels for the dtype on this CPU; 'onednn' insists (OneDNNConvError says why
  it can't); 'xla' never loads them. compute.resolve is its one caller (once per start or
  load).
  """
  dtype = np.dtype(dtype).name
  backend = jax.default_backend()
  if impl == 'xla':
    return False, 'model.conv=xla'
  if backend != 'cpu':
    if impl == 'onednn':
      raise OneDNNConvError(
        f"model.conv=onednn runs only on the CPU; this run's backend is "
        f'{backend}: use model.conv=auto or xla'
      )
    return False, f"XLA's convolutions on {backend}"
  if not onednn_build.load():
    error = onednn_build.unavailable_reason()
    if impl == 'onednn':
      raise OneDNNConvError(
        f'model.conv=onednn, but the oneDNN kernels are unavailable: '
        f'{error}; {HINT}'
      )
    return False, f'oneDNN unavailable ({error})'
  status, info = onednn_build.probe(dtype)
  version = onednn_build.version()
  if status != Status.OPTIMIZED:
    if impl == 'onednn':
      raise OneDNNConvError(
        f'model.conv=onednn, but oneDNN {version} has no optimized {dtype} '
        f'convolution on this CPU ({info}); {HINT} or another model.dtype'
      )
    return (
      False,
      f'oneDNN {version} has no optimized {dtype} convolution on this CPU ({info})',
    )
  return True, f'oneDNN {version} {dtype} kernels ({info})'
