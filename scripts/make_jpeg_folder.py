r"""Writes an ImageNet-like folder of generated JPEGs, for loader tests and benchmarks.

  python scripts/make_jpeg_folder.py /tmp/fake-imagenet --classes 100 --train 2000 --val 50

ROOT/train/nCLASS/I.JPEG and ROOT/val/nCLASS/I.JPEG, each image a random size between
--min and --max pixels a side (ImageNet's are mostly 160-500), smooth colour fields with
noise: real JPEG decode work at realistic sizes, not a dataset to learn from. Written in
parallel worker processes; an existing file is kept, so a killed run continues.
"""

import argparse
import multiprocessing
import os

import numpy as np
from PIL import Image


def write(job):
  path, seed, lo, hi = job
  if os.path.exists(path):
    return
  rng = np.random.default_rng(seed)
  width, height = (int(v) for v in rng.integers(lo, hi + 1, 2))
  coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
  image = np.asarray(coarse.resize((width, height), Image.BICUBIC), np.int16)
  image = image + rng.integers(-20, 21, (height, width, 1), dtype=np.int16)
  tmp = path + '.tmp'
  Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
    tmp, 'JPEG', quality=85
  )
  os.replace(tmp, path)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('root')
  parser.add_argument('--classes', type=int, default=100)
  parser.add_argument(
    '--train', type=int, default=2000, help='images per class in train'
  )
  parser.add_argument(
    '--val', type=int, default=50, help='images per class in val'
  )
  parser.add_argument('--min', type=int, default=160)
  parser.add_argument('--max', type=int, default=500)
  parser.add_argument('--workers', type=int, default=os.cpu_count())
  args = parser.parse_args()
  jobs = []
  for split, count in (('train', args.train), ('val', args.val)):
    for c in range(args.classes):
      folder = os.path.join(args.root, split, f'n{c:08d}')
      os.makedirs(folder, exist_ok=True)
      seed0 = (0 if split == 'train' else 10**9) + c * 100_000
      jobs += [
        (os.path.join(folder, f'{i}.JPEG'), seed0 + i, args.min, args.max)
        for i in range(count)
      ]
  with multiprocessing.Pool(args.workers) as pool:
    for done, _ in enumerate(
      pool.imap_unordered(write, jobs, chunksize=256), 1
    ):
      if done % 20_000 == 0 or done == len(jobs):
        print(f'{done}/{len(jobs)} images', flush=True)


if __name__ == '__main__':
  main()
