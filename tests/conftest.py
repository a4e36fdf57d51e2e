"""Shared fixtures: two CPU devices, a tiny generated image-folder dataset, tiny configs.

The suite runs on whatever backend JAX picks (a GPU where there is one; JAX_PLATFORMS=cpu
forces the CPU). Markers (pyproject.toml) say what a test needs:
- `cpu_only`: tests a CPU-only part (oneDNN, the CPU instruction-set choice, host devices
  forced by XLA_FLAGS, Gloo); skipped with the reason on any other backend.
- `gpu`: the small set that must run on the accelerator where there is one (train step,
  pmap over the local devices, bf16, a checkpoint made on the CPU used on this backend,
  rotjax.load().predict): `python -m pytest -m gpu` is the quick check of a GPU machine.
Tests that need two devices skip where there is one (a single GPU).
"""

import os

# Before jax is imported anywhere: two host devices so pmap code runs multi-device on CPU.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
# GPU convolutions and reductions pick algorithms that need not give the same bits twice;
# the tests that compare a resumed run with an unbroken one need them to (a flag of XLA's
# shared debug options: the CPU backend accepts it and has nothing to change).
if '--xla_gpu_deterministic_ops' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_gpu_deterministic_ops=true'
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import tempfile

import jax
import pytest

from rotjax.testing import make_image_folder, tiny_config  # noqa: F401  (tests import them from here)

# Many tests compile the same tiny programs: a persistent cache makes repeats cheap.
jax.config.update(
  'jax_compilation_cache_dir',
  os.environ.get(
    'ROTJAX_TEST_JIT_CACHE',
    os.path.join(tempfile.gettempdir(), 'rotjax-test-jit-cache'),
  ),
)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)

# A marker, not a skipif: conftest is imported by worker scripts (multihost_worker.py) that
# must call jax.distributed.initialize before anything starts a backend.
two_devices = pytest.mark.two_devices


def pytest_collection_modifyitems(config, items):
  backend, count = jax.default_backend(), jax.local_device_count()
  for item in items:
    marker = item.get_closest_marker('cpu_only')
    if marker is not None and backend != 'cpu':
      why = marker.args[0] if marker.args else 'a CPU-only part'
      item.add_marker(
        pytest.mark.skip(reason=f'tests {why}; the backend here is {backend}')
      )
    if item.get_closest_marker('two_devices') is not None and count < 2:
      item.add_marker(
        pytest.mark.skip(reason=f'needs 2 devices; {backend} has {count}')
      )


@pytest.fixture(scope='session')
def image_folder(tmp_path_factory):
  return make_image_folder(tmp_path_factory.mktemp('tiny_folder'))


@pytest.fixture
def make_config(image_folder):
  return lambda stage, workdir, **kw: tiny_config(
    stage, workdir, image_folder, **kw
  )
