"""The oneDNN installations found here (ROTJAX_ONEDNN_ROOT replaces the search)."""

import _path  # noqa: F401  (this checkout first)
from rotjax.cpu import onednn_build

print([(i.source, i.version) for i in onednn_build.installations()])
