"""Tiny generated data and configs: what the tests, scripts/fault_drill.py and
scripts/startup_benchmark.py train on when a run must take seconds, not minutes."""

import os

import numpy as np

CLASSES = ('circle', 'square', 'stripes')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(**overrides) -> dict:
  """The environment for a child Python process: this checkout first on PYTHONPATH, the
  caller's PYTHONPATH kept after it (where packages may live that pip did not install,
  e.g. wheels unpacked into a folder on a GPU machine), then `overrides`."""
  path = os.pathsep.join(
    p for p in (REPO, os.environ.get('PYTHONPATH', '')) if p
  )
  return {**os.environ, 'PYTHONPATH': path, **overrides}


def shm_files(pids) -> set:
  """(name, inode) of the /dev/shm files that processes `pids` have mapped and a run of
  ours leaves if nothing cleans up: streaming rings (rotjax-*) and multiprocessing's
  semaphores (sem.rotjax-* for a streaming process, else sem.mp-*: Grain's queues and
  events). By inode: a semaphore's creator maps the temporary name glibc made it under."""
  from rotjax import shared_ring

  inodes = shared_ring.mapped_inodes(pids)
  try:
    entries = list(os.scandir(shared_ring.SHM_FOLDER))
  except OSError:
    return set()
  return {
    (e.name, e.inode())
    for e in entries
    if e.name.startswith(('rotjax-', 'sem.rotjax-', 'sem.mp-'))
    and e.inode() in inodes
  }


def still_there(files) -> list[str]:
  """The names of `files` (from shm_files) still in /dev/shm, the same files."""
  from rotjax import shared_ring

  left = []
  for name, inode in files:
    try:
      if os.stat(os.path.join(shared_ring.SHM_FOLDER, name)).st_ino == inode:
        left.append(name)
    except OSError:
      pass
  return sorted(left)


def group_processes(pgid: int) -> list[int]:
  """The live processes of process group `pgid` (a zombie waiting for its reaper is not)."""
  pids = []
  for d in os.listdir('/proc'):
    try:
      with open(f'/proc/{d}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    except (OSError, IndexError):
      continue
    if d.isdigit() and int(fields[2]) == pgid and fields[0] != 'Z':
      pids.append(int(d))
  return pids


def draw(kind: str, rng, size: int) -> np.ndarray:
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


def make_image_folder(
  root, splits=(('train', 24), ('test', 8)), size=16, seed=0
) -> str:
  """ROOT/SPLIT/CLASS/N.png for the three CLASSES; returns ROOT."""
  from PIL import Image

  rng = np.random.default_rng(seed)
  for split, count in splits:
    for name in CLASSES:
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
      for i in range(count):
        Image.fromarray(draw(name, rng, size)).save(
          os.path.join(root, split, name, f'{i}.png')
        )
  return str(root)


# A stage's smoke preset shrunk further: width-4 ResNet18 on 16 px images, float32 so that
# equality tests are tight (the bf16 default runs in the imagenette and study tests).
TINY = {
  'data.image_size': 16,
  'data.cache_dir': '',
  'data.max_train_images': 0,
  'data.max_eval_images': 0,
  'data.val_fraction': 0.25,
  'model.width': 4,
  'model.dtype': 'float32',
  'batch_size': 8,
  'eval_batch_size': 8,
}


def _set(config, key: str, value) -> None:
  node = config
  *parents, leaf = key.split('.')
  for p in parents:
    node = node[p]
  node[leaf] = value


def tiny_config(stage: str, workdir, source: str, **overrides):
  """`configs/STAGE.py:smoke` with TINY, reading the image folder `source`."""
  from configs import finetune, pretext, supervised

  module = {'pretext': pretext, 'finetune': finetune, 'supervised': supervised}[
    stage
  ]
  config = module.get_config('smoke')
  config.workdir = str(workdir)
  config.data.source = f'folder:{source}'
  for key, value in {**TINY, **overrides}.items():
    _set(config, key, value)
  return config


def tiny_flags(stage: str, workdir, source: str, **overrides) -> list[str]:
  """The command-line flags of `python -m rotjax.main` that train tiny_config."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  settings = {
    'workdir': str(workdir),
    'data.source': f'folder:{source}',
    **TINY,
    **overrides,
  }
  return [f'--config={os.path.join(root, "configs", stage + ".py")}:smoke'] + [
    f'--config.{key}={value}' for key, value in settings.items()
  ]
