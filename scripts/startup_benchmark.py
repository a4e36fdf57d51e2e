"""How long a run takes to start training: cold compile against the compilation cache.

  python scripts/startup_benchmark.py                       # CPU: width-16 ResNet18 (:cpu)
  python scripts/startup_benchmark.py --width 64 --batch 128  # the full-size model
  python scripts/startup_benchmark.py --source folder:~/.cache/rotjax/cifar10-jpeg
  python scripts/startup_benchmark.py --parallel jit   # one data-parallel mode only

Runs, each in a fresh process, one epoch of a small subset (the compile does not depend on
the number of images), against an empty compilation cache folder of its own:
  1. pretext               cold: every program compiled
  2. fine-tune from 1      (stage 2) the pretext's programs do not fit it: compiled
  3. fine-tune, random     (stage 3) the same programs as 2: loaded from the cache
  4. fine-tune from 1      again, a new workdir (a second seed, a rerun): loaded
  5. stage 3 with the cache off, for comparison
once per data-parallel mode (config.parallel: jit, the default, and pmap; each mode with
its own empty cache), and prints, per run, what its log lines say: where the model init,
train step and eval step programs came from and how long each took, and how long after the
data was loaded its first train step was done. Also in benchmark-startup.json.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(
  r'\] (model init|train step|eval step): (.+?) in ([0-9.]+) s'
  r'(?: \(first call, one step included(?:; done ([0-9.]+) s after the data was loaded)?\))?'
)


def run_stage(name, config, workdir, cache, opts, *extra):
  flags = [
    f'--config={ROOT}/configs/{config}.py:cpu',
    f'--config.workdir={workdir}',
    f'--config.data.source={opts.source}',
    f'--config.data.max_train_images={opts.images}',
    f'--config.data.max_eval_images={opts.images}',
    '--config.num_epochs=1',
    f'--config.model.width={opts.width}',
    f'--config.batch_size={opts.batch}',
    f'--config.eval_batch_size={opts.batch}',
    '--config.progress=False',
    *extra,
  ]
  env = {**os.environ, 'ROTJAX_COMPILE_CACHE': cache}
  start = time.perf_counter()
  out = subprocess.run(
    [sys.executable, '-m', 'rotjax.main', *flags],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=env,
  )
  wall = time.perf_counter() - start
  if out.returncode:
    sys.exit(f'{name} failed:\n{out.stderr[-3000:]}')
  row = {'run': name, 'wall_s': round(wall, 1)}
  for program, source, seconds, after in LINE.findall(out.stderr):
    row[program] = {'source': source, 'seconds': float(seconds)}
    if after:
      row['first_step_after_data_s'] = float(after)
  return row


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--source', default='folder:~/.cache/rotjax/cifar10-jpeg')
  parser.add_argument('--width', type=int, default=16)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument(
    '--images', type=int, default=512, help='train/val/test images each'
  )
  parser.add_argument(
    '--parallel',
    default='jit,pmap',
    help='comma-separated config.parallel modes, each a full set of runs',
  )
  parser.add_argument('--out', default='benchmark-startup.json')
  opts = parser.parse_args()
  rows = []
  for mode in opts.parallel.split(','):
    rows += [
      {'mode': mode, **row}
      for row in mode_rows(opts, f'--config.parallel={mode}')
    ]
  print(
    f'startup, width {opts.width}, batch {opts.batch}, {opts.images} images, '
    f'{os.cpu_count()} cores'
  )
  print(
    '| mode | run | model init | train step (first call) | eval step (first call) | '
    'first step done after data loaded | wall |'
  )
  print('| --- | --- | --- | --- | --- | --- | --- |')
  cell = lambda r, k: (
    f'{r[k]["seconds"]:.1f} s, {r[k]["source"]}' if k in r else '?'
  )
  for r in rows:
    print(
      f'| {r["mode"]} | {r["run"]} | {cell(r, "model init")} | {cell(r, "train step")} | '
      f'{cell(r, "eval step")} | {r.get("first_step_after_data_s", "?")} s | {r["wall_s"]} s |'
    )
  with open(opts.out, 'w') as f:
    json.dump({'options': vars(opts), 'rows': rows}, f, indent=2)


def mode_rows(opts, mode_flag):
  """The five runs of the docstring, each with `mode_flag`, against one fresh cache."""
  with tempfile.TemporaryDirectory() as tmp:
    cache = os.path.join(tmp, 'jit')
    pre = os.path.join(tmp, 'pretext')
    run = lambda name, config, workdir, cache, *extra: run_stage(
      name, config, workdir, cache, opts, mode_flag, *extra
    )
    return [
      run('1 pretext (cold cache)', 'pretext', pre, cache),
      run(
        '2 fine-tune pretrained',
        'finetune',
        os.path.join(tmp, 's2'),
        cache,
        f'--config.init_from={pre}',
      ),
      run(
        '3 fine-tune random init', 'finetune', os.path.join(tmp, 's3'), cache
      ),
      run(
        '2 again, new workdir',
        'finetune',
        os.path.join(tmp, 's2b'),
        cache,
        f'--config.init_from={pre}',
        '--config.seed=1',
      ),
      run('3, cache off', 'finetune', os.path.join(tmp, 's3off'), '0'),
    ]


if __name__ == '__main__':
  main()
