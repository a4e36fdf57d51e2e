"""The errors of the oneDNN kernels, named for what failed, and `named_errors`.

Both kernels (onednn_conv.py, onednn_batchnorm.py) raise these and the callers of a
compiled step (train.py, api.py) catch by them, so they live here, apart from either
kernel: neither kernel module needs the other.
"""

import contextlib

import jax


class OneDNNConvError(RuntimeError):
  """A convolution oneDNN could not create or run; the message names its shape and dtype."""


class OneDNNNormError(RuntimeError):
  """A BatchNorm oneDNN could not create or run; the message names its shape and dtype."""


# What the C++ handlers (csrc/) put in the error of a failed custom call.
_MARKERS = (
  ('rotjax oneDNN conv', OneDNNConvError),
  ('rotjax oneDNN batch norm', OneDNNNormError),
)


@contextlib.contextmanager
def named_errors():
  """Re-raises a oneDNN failure inside a compiled step as OneDNNConvError or OneDNNNormError
  (also a decorator): XLA reports it as a bare JaxRuntimeError."""
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    for marker, error in _MARKERS:
      if marker in str(e):
        raise error(str(e)) from e
    raise
