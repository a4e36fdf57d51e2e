"""A build whose headers are of one oneDNN and library of another is refused, never loaded."""

import _path  # noqa: F401  (this checkout first)
from rotjax.cpu import onednn_build as b

pip = next(i for i in b.installations() if i.source == 'pip')
system = next(i for i in b.installations() if i.source == 'system')
for headers, lib_dir in ((pip.include, None), (system.include, pip.lib_dir)):
  try:
    b.build_and_open(b.Installation('mixed', headers, lib_dir, 'x'))
    print('LOADED')
  except (OSError, RuntimeError) as e:
    print('REFUSED', str(e).splitlines()[0][:200])
