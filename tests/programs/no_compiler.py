"""Without a C++ compiler (CXX points nowhere): `auto` falls back, `onednn` says why."""

import _path  # noqa: F401  (this checkout first)
from rotjax.cpu import onednn_conv

assert onednn_conv.uses_onednn('auto', 'float32')[0] is False
try:
  onednn_conv.uses_onednn('onednn', 'float32')
except RuntimeError as e:
  print(e)
