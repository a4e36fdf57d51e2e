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
import numpy as np
import pytest

# Many tests compile the same tiny programs: a persistent cache makes repeats cheap.
jax.config.update('jax_compilation_cache_dir',
                  os.environ.get('ROTJAX_TEST_JIT_CACHE', os.path.join(tempfile.gettempdir(), 'rotjax-test-jit-cache')))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
from PIL import Image

# A marker, not a skipif: conftest is imported by worker scripts (multihost_worker.py) that
# must call jax.distributed.initialize before anything starts a backend.
two_devices = pytest.mark.two_devices


def pytest_collection_modifyitems(config, items):
  backend, count = jax.default_backend(), jax.local_device_count()
  for item in items:
    marker = item.get_closest_marker('cpu_only')
    if marker is not None and backend != 'cpu':
      why = marker.args[0] if marker.args else 'a CPU-only part'
      item.add_marker(pytest.mark.skip(reason=f'tests {why}; the backend here is {backend}'))
    if item.get_closest_marker('two_devices') is not None and count < 2:
      item.add_marker(pytest.mark.skip(reason=f'needs 2 devices; {backend} has {count}'))


CLASSES = ('circle', 'square', 'stripes')


def _draw(kind: str, rng, size: int) -> np.ndarray:
  """A class-dependent pattern in a random colour on noise: learnable in a few steps."""
  yy, xx = np.mgrid[:size, :size]
  c = (size - 1) / 2
  if kind == 'circle':
    shape = (yy - c) ** 2 + (xx - c) ** 2 < (size / 3) ** 2
  elif kind == 'square':
    shape = (abs(yy - c) < size / 4) & (abs(xx - c) < size / 4)
  else:
    shape = (xx // 2) % 2 == 0
  image = rng.integers(0, 60, (size, size, 3))
  image[shape] = rng.integers(150, 256, 3)
  # An asymmetric marker, so that rotations are distinguishable.
  image[: size // 4, : size // 8] = 255
  return image.astype(np.uint8)


def make_image_folder(root, splits=(('train', 24), ('test', 8)), size=16, seed=0):
  rng = np.random.default_rng(seed)
  for split, count in splits:
    for name in CLASSES:
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
      for i in range(count):
        Image.fromarray(_draw(name, rng, size)).save(os.path.join(root, split, name, f'{i}.png'))
  return str(root)


@pytest.fixture(scope='session')
def image_folder(tmp_path_factory):
  return make_image_folder(tmp_path_factory.mktemp('tiny_folder'))


def tiny_config(stage: str, workdir, source: str, **overrides):
  """A stage's smoke config shrunk further: width-4 ResNet18 on 16px images."""
  from configs import finetune, pretext, supervised
  config = {'pretext': pretext, 'finetune': finetune, 'supervised': supervised}[stage].get_config('smoke')
  config.workdir = str(workdir)
  config.data.source = f'folder:{source}'
  config.data.image_size = 16
  config.data.cache_dir = ''
  config.data.max_train_images = 0
  config.data.max_eval_images = 0
  config.data.val_fraction = 0.25
  config.model.width = 4
  # float32 so equality tests are tight; the bf16 default runs in imagenette/study tests.
  config.model.dtype = 'float32'
  config.batch_size = 8
  config.eval_batch_size = 8
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture
def make_config(image_folder):
  return lambda stage, workdir, **kw: tiny_config(stage, workdir, image_folder, **kw)
