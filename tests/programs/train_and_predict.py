"""Trains one tiny epoch with the default compute settings, then predicts through rotjax.load.

Run by cpu_paths_test.py in a fresh interpreter per environment (ONEDNN_MAX_CPU_ISA,
ROTJAX_ONEDNN), since both are read once per process. Prints one JSON line.
"""

import json
import os
import sys

import _path  # noqa: F401  (this checkout first)
from rotjax.cpu import platform

platform.configure()

import conftest  # noqa: E402  (after platform.configure: XLA flags before jax starts)
import numpy as np  # noqa: E402

import rotjax  # noqa: E402
from rotjax import train  # noqa: E402


def main(folder, workdir, stage):
  config = conftest.tiny_config(stage, workdir, folder, num_epochs=1)
  config.model.dtype = (
    'auto'  # the defaults under test, not the suite's float32
  )
  config.model.conv = 'auto'
  summary = train.train_and_evaluate(config)
  model = rotjax.load(workdir)
  images = np.random.default_rng(0).integers(
    0, 256, (3, 16, 16, 3), dtype=np.uint8
  )
  probs = model.predict(images)
  with open(os.path.join(workdir, 'run_info.json')) as f:
    compute = json.load(f)['compute']
  print(
    json.dumps(
      {
        'compute': compute,
        'probs_shape': list(probs.shape),
        'probs_finite': bool(np.isfinite(probs).all()),
        'row_sums': probs.sum(-1).tolist(),
        'epochs': summary['epochs'],
      }
    )
  )


if __name__ == '__main__':
  main(*sys.argv[1:])
