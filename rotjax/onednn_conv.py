"""Convolutions on the CPU through oneDNN, as XLA FFI custom calls with a custom VJP.

Why: XLA's CPU backend runs a bfloat16 convolution as a float32 Eigen convolution
with converts around it, so bf16 gives the convolutions (nearly all of a ResNet's
FLOPs) nothing on CPU. oneDNN has native bf16 kernels (AVX512-BF16, AMX) and is
what PyTorch's CPU convolutions run on. `conv_general_dilated` below is a drop-in
for `lax.conv_general_dilated` that Flax's `nn.Conv` takes as an argument; it
sends the plain 2-D NHWC/HWIO case to oneDNN and everything else to XLA.

The C++ side (csrc/onednn_conv.cc) is compiled on first use into
~/.cache/rotjax/onednn/ (about 10 s), which needs a C++ compiler and oneDNN's
headers and library (Debian: `apt-get install libdnnl-dev`). Where that fails,
'auto' falls back to XLA's convolution and says why once in the log.
"""
import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import numpy as np
from jax import lax

IMPLS = ('auto', 'xla', 'onednn')
SOURCE = Path(__file__).parent / 'csrc' / 'onednn_conv.cc'
_TARGETS = {'forward': 'RotjaxConvForward', 'backward_data': 'RotjaxConvBackwardData',
            'backward_weights': 'RotjaxConvBackwardWeights'}
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))

_lock = threading.Lock()
_state = {}   # 'ok': bool, 'error': str, once the library was built or failed to


def cache_dir() -> Path:
  root = os.environ.get('ROTJAX_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'rotjax'))
  return Path(root) / 'onednn'


def _library_path() -> Path:
  # Keyed on everything the binary depends on: our source, the FFI headers' jaxlib.
  key = hashlib.sha256(SOURCE.read_bytes() + importlib.metadata.version('jaxlib').encode())
  return cache_dir() / f'librotjax_onednn_{key.hexdigest()[:16]}.so'


def _compile(target: Path) -> None:
  cxx = os.environ.get('CXX') or shutil.which('c++') or shutil.which('g++')
  if not cxx:
    raise RuntimeError('no C++ compiler found (set CXX or install g++)')
  target.parent.mkdir(parents=True, exist_ok=True)
  # Build beside the target and rename: another process may be loading it.
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=target.parent)
  os.close(fd)
  cmd = [cxx, '-O2', '-std=c++17', '-shared', '-fPIC', '-w', f'-I{jax.ffi.include_dir()}',
         str(SOURCE), '-o', tmp, '-ldnnl']
  if os.environ.get('ROTJAX_ONEDNN_ROOT'):   # a oneDNN outside the system paths
    root = os.environ['ROTJAX_ONEDNN_ROOT']
    cmd[1:1] = [f'-I{root}/include', f'-L{root}/lib', f'-Wl,-rpath,{root}/lib']
  result = subprocess.run(cmd, capture_output=True, text=True)
  if result.returncode != 0:
    os.unlink(tmp)
    detail = result.stderr.strip().splitlines()
    raise RuntimeError(f'compiling {SOURCE.name} failed ({" ".join(cmd[:1])}): '
                       + ' | '.join(detail[:3]) + '; is oneDNN installed (apt-get install libdnnl-dev)?')
  os.replace(tmp, target)


def load() -> bool:
  """Builds (once per machine) and registers the oneDNN kernels; False if they can't be."""
  with _lock:
    if 'ok' not in _state:
      try:
        path = _library_path()
        if not path.exists():
          logging.info('Compiling the oneDNN convolution kernels into %s', path)
          _compile(path)
        lib = ctypes.cdll.LoadLibrary(str(path))
        for name in _TARGETS.values():
          jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform='cpu')
        _state.update(ok=True, error='')
      except (OSError, RuntimeError, AttributeError) as e:
        _state.update(ok=False, error=str(e))
        logging.warning('oneDNN convolutions unavailable, using XLA\'s: %s', e)
  return _state['ok']


def unavailable_reason() -> str:
  load()
  return _state['error']


def _attrs(strides, padding):
  (pt, pb), (pl, pr) = padding
  return dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]), pad_top=np.int64(pt),
              pad_bottom=np.int64(pb), pad_left=np.int64(pl), pad_right=np.int64(pr))


def _call(kind, out_shape, out_dtype, a, b, strides, padding):
  return jax.ffi.ffi_call(_TARGETS[kind], jax.ShapeDtypeStruct(out_shape, out_dtype))(
      a, b, **_attrs(strides, padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, w, strides, padding):
  """NHWC x HWIO -> NHWC, no dilation or groups; strides (h, w), padding ((t, b), (l, r))."""
  out_hw = [(x.shape[1 + i] + sum(padding[i]) - w.shape[i]) // strides[i] + 1 for i in range(2)]
  return _call('forward', (x.shape[0], *out_hw, w.shape[3]), x.dtype, x, w, strides, padding)


def _conv2d_fwd(x, w, strides, padding):
  return conv2d(x, w, strides, padding), (x, w)


def _conv2d_bwd(strides, padding, residuals, dy):
  x, w = residuals
  dy = dy.astype(x.dtype)
  dx = _call('backward_data', x.shape, x.dtype, dy, w, strides, padding)
  dw = _call('backward_weights', w.shape, w.dtype, x, dy, strides, padding)
  return dx, dw


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def _supported(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
               feature_group_count) -> bool:
  plain = lambda d: d is None or all(v == 1 for v in d)
  return (lhs.ndim == 4 and lhs.dtype == rhs.dtype and lhs.dtype.name in ('float32', 'bfloat16')
          and not isinstance(padding, str) and plain(lhs_dilation) and plain(rhs_dilation)
          and feature_group_count == 1
          and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _NHWC)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None,
                         **kwargs):
  """`lax.conv_general_dilated` with the plain 2-D NHWC case on oneDNN (see module doc)."""
  if (not kwargs and load() and _supported(lhs, rhs, padding, lhs_dilation, rhs_dilation,
                                dimension_numbers, feature_group_count)):
    return conv2d(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding))
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                  dimension_numbers, feature_group_count, precision=precision,
                                  **kwargs)


def check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f'model.conv={impl!r} is unknown; allowed: {IMPLS}')


def resolve(impl: str):
  """The convolution function for `model.conv`: None means XLA's own.

  'auto' is oneDNN when JAX's default backend is the CPU and the kernels build;
  'onednn' insists (an error says why it can't); 'xla' never uses them.
  """
  check_impl(impl)
  if impl == 'xla' or (impl == 'auto' and jax.default_backend() != 'cpu'):
    return None
  if load():
    return conv_general_dilated
  if impl == 'onednn':
    raise RuntimeError(f'model.conv=onednn, but the oneDNN kernels are unavailable: {_state["error"]}')
  return None
