"""The CPU's instruction-set class: its /proc/cpuinfo flags, capped by ONEDNN_MAX_CPU_ISA.

`ONEDNN_MAX_CPU_ISA` (oneDNN's switch to act as an older CPU) caps what rotjax believes
the CPU has too, so `ONEDNN_MAX_CPU_ISA=AVX2` on any machine takes the whole path an
AVX2-only machine takes (compute.py's choices, onednn_build.py's choice of oneDNN).
That is how the tests cover the lesser paths.
"""

import functools
import os
import platform

# CPU classes, weakest first, with the /proc/cpuinfo flags that make each.
ISA_CLASSES = (
  ('older', ()),
  ('avx2', ('avx2', 'fma')),
  ('avx512', ('avx512f', 'avx512bw', 'avx512vl')),
  ('avx512_bf16', ('avx512_bf16',)),
  ('amx', ('amx_bf16', 'amx_tile')),
)
# ONEDNN_MAX_CPU_ISA values (lower case) and the class they cap the CPU at.
_ONEDNN_CAPS = {
  'sse41': 'older',
  'avx': 'older',
  'avx2': 'avx2',
  'avx2_vnni': 'avx2',
  'avx2_vnni_2': 'avx2',
  'avx512_core': 'avx512',
  'avx512_core_vnni': 'avx512',
  'avx512_core_bf16': 'avx512_bf16',
  'avx512_core_fp16': 'avx512_bf16',
  'avx10_1_512': 'avx512_bf16',
  'avx512_core_amx': 'amx',
  'avx512_core_amx_fp16': 'amx',
  'all': 'amx',
  'default': 'amx',
}
NATIVE_BF16_CLASSES = ('avx512_bf16', 'amx')


@functools.lru_cache(maxsize=None)
def _cpuinfo(field: str) -> str:
  """The first `field` line of /proc/cpuinfo ('' where there is none)."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith(field):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return ''


def cpu_flags() -> frozenset:
  """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
  return frozenset(_cpuinfo('flags').split())


def cpu_model() -> str:
  return _cpuinfo('model name') or platform.processor() or platform.machine()


def isa_class(flags=None, cap=None) -> str:
  """The strongest class in ISA_CLASSES whose flags the CPU has, capped by ONEDNN_MAX_CPU_ISA."""
  flags = cpu_flags() if flags is None else flags
  best = 'older'
  for name, needed in ISA_CLASSES[1:]:  # each class implies the ones before it
    if all(f in flags for f in needed):
      best = name
  cap = os.environ.get('ONEDNN_MAX_CPU_ISA', '') if cap is None else cap
  cap_class = _ONEDNN_CAPS.get(cap.strip().lower())
  if cap_class is not None:
    names = [n for n, _ in ISA_CLASSES]
    best = names[min(names.index(best), names.index(cap_class))]
  return best
