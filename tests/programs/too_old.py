"""A oneDNN older than rotjax needs: `auto` falls back to XLA, `onednn` names why."""

import _path  # noqa: F401  (this checkout first)
from rotjax.cpu import onednn_build, onednn_conv, onednn_errors

onednn_build.MIN_VERSION = (
  99,
  0,
)  # as if the installed oneDNN were older than rotjax needs
print('LOADED', onednn_build.load())
print('REASON', onednn_build.unavailable_reason())
print('AUTO', onednn_conv.uses_onednn('auto', 'float32')[0])
try:
  onednn_conv.uses_onednn('onednn', 'float32')
except onednn_errors.OneDNNConvError as e:
  print('NAMED', e)
