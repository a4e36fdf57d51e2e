"""Without a C++ compiler (CXX points nowhere): `auto` falls back, `onednn` says why."""
import _path  # noqa: F401  (this checkout first)
from rotjax.cpu import onednn_conv

assert onednn_conv.resolve('auto') is None
try:
  onednn_conv.resolve('onednn')
except RuntimeError as e:
  print(e)
