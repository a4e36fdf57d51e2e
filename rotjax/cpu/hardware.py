"""What this machine is, for the record of a run's compute (rotjax/compute.py decides).

The CPU's model, instruction-set class and flags come from /proc/cpuinfo (isa.py;
`ONEDNN_MAX_CPU_ISA` caps the class, for the tests of the lesser paths), oneDNN's
version and abilities from onednn_build. Nothing here chooses anything: run_info.json
and the log line say on what machine a choice was made, so a resumed run can name both
machines when the second cannot continue it.
"""

import os

import jax

from rotjax.cpu import onednn_build
from rotjax.cpu.isa import cpu_flags, cpu_model, isa_class


def facts(onednn: bool) -> dict:
  """The backend and device; on the CPU its model, class and vector flags, and where
  `onednn` (the run may use oneDNN), the oneDNN found and what it optimizes."""
  info = {
    'backend': jax.default_backend(),
    'device_kind': jax.devices()[0].device_kind,
  }
  if info['backend'] != 'cpu':
    return info
  info.update(
    cpu=cpu_model(),
    cpu_isa_class=isa_class(),
    cpu_flags=sorted(
      f for f in cpu_flags() if f.startswith(('avx', 'amx', 'fma'))
    ),
    onednn_max_cpu_isa=os.environ.get('ONEDNN_MAX_CPU_ISA', ''),
  )
  if onednn:
    info.update(
      onednn_version=onednn_build.version(),
      onednn_source=onednn_build.source(),
      onednn_found=[
        f'{i.source} {i.version}' for i in onednn_build.installations()
      ],
      onednn_dtypes=list(onednn_build.supported_dtypes()),
      onednn_unavailable=onednn_build.unavailable_reason(),
    )
  return info
