"""Where and with what a study's runs trained: machine, library versions, command line.

Recorded in each run's study_run.json when it trains (a study resumed on another machine
shows both), and shown in the report's Machine section.
"""

import importlib.metadata
import os
import platform
import sys

PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy')


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return 'not installed'


def describe() -> dict:
  """This process's machine and versions; jax must be importable (it is, in a study)."""
  import jax
  from rotjax.cpu import isa

  device = jax.devices()[0]
  machine = {
    'backend': jax.default_backend(),
    'devices': jax.device_count(),
    'cpu': isa.cpu_model(),
    'cores': os.cpu_count(),
  }
  if machine['backend'] == 'cpu':
    machine['isa_class'] = isa.isa_class()
  else:
    machine['device_kind'] = device.device_kind
  return {
    'machine': machine,
    'versions': {
      'python': platform.python_version(),
      **{p: _version(p) for p in PACKAGES},
    },
    'command': ' '.join(['python -m rotjax.study'] + sys.argv[1:])
    if sys.argv
    and sys.argv[0].endswith(os.path.join('rotjax', 'study', '__main__.py'))
    else ' '.join(sys.argv),
  }


def machine_line(env: dict) -> str:
  """'Intel Xeon (class amx), 2 cores, cpu' or 'NVIDIA H200 x1 (gpu), host ...'."""
  m = env.get('machine', {})
  if m.get('backend') == 'cpu':
    return (
      f'{m.get("cpu")} (class {m.get("isa_class")}), {m.get("cores")} cores'
    )
  return (
    f'{m.get("device_kind")} x{m.get("devices")} ({m.get("backend")}), host '
    f'{m.get("cpu")} with {m.get("cores")} cores'
  )


def versions_line(env: dict) -> str:
  return ', '.join(f'{k} {v}' for k, v in env.get('versions', {}).items())
