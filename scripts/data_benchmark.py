r"""Input pipeline speed, side by side in one run (`python scripts/benchmark.py --data`).

  python scripts/benchmark.py --data                       # both parts below
  python scripts/benchmark.py --data --parts loaders       # loaders alone
  python scripts/benchmark.py --data --folder /tmp/fake-imagenet --parts startup

1. loaders: images/s of each loader alone, decoding CIFAR-10 (JPEG, 32 px) and ImageNette
   (224 px JPEGs, kept at 256 px for 224 px crops), on 1, 2 and all cores (each row in a
   child process whose CPU affinity is that many cores; its decoding workers inherit it):
   - memory: memory_loader.decode_files, what data.loader=memory does once per split;
   - memory, threads (before): the thread pool around PIL that it replaced (decoded
     images stacked into the split's array afterwards);
   - stream: streaming.stream over a training epoch's plan (worker start included);
   - tf.data: tf.io.decode_jpeg + tf.image.resize (bicubic, antialiased) with that many
     parallel calls, the candidate library (not bit-identical to PIL's resampling).
2. loop: the training loop's images/s as a share of the bare train step's (the same
   step on one batch already on the device), ImageNette at 224 px, ResNet18 with the
   ImageNet stem, per loader.
3. startup (with --folder, an ImageNet-layout folder, e.g. 200,000 JPEGs from
   scripts/make_jpeg_folder.py): `python -m rotjax.main` with configs/imagenet.py on
   it: seconds to the data being ready and to the first train step done, and the peak
   memory of the trainer and its workers (RSS of the trainer; PSS summed over the
   process tree, so that pages they share count once).
Figures are from one run of this script on one machine; the header names the CPU.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CACHE = os.path.expanduser('~/.cache/rotjax')
DATASETS = {  # name: (folder, split, storage size)
  'CIFAR-10 32px': (os.path.join(CACHE, 'cifar10-jpeg'), 'train', 32),
  'ImageNette 224px': (os.path.join(CACHE, 'imagenette-224'), 'train', 256),
}
LOADERS = ('memory', 'memory, threads (before)', 'stream', 'tf.data')


# ---------------------------------------------------------------- loaders (child processes)


def _files(folder, split, count):
  from rotjax import image_files

  files, labels, _ = image_files.list_folder_split(folder, split)
  # A seeded sample across classes (folders list class by class).
  pick = np.sort(np.random.default_rng(0).permutation(len(files))[:count])
  return [files[i] for i in pick], labels[pick]


def loader_child(opts) -> dict:
  os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: opts['cores']]))
  files, labels = _files(opts['folder'], opts['split'], opts['images'])
  size, loader, cores = opts['size'], opts['loader'], opts['cores']
  t0 = time.perf_counter()
  first = steady = None
  if loader == 'memory':
    from rotjax import memory_loader

    memory_loader.MIN_FILES_FOR_WORKERS = (
      0  # workers whatever the count, as for a big split
    )
    count = len(memory_loader.decode_files(files, labels, size, workers=cores))
  elif loader == 'memory, threads (before)':
    import concurrent.futures
    from rotjax import image_files

    with concurrent.futures.ThreadPoolExecutor(cores) as pool:
      decoded = list(
        pool.map(lambda f: image_files.decode_image(f, size), files)
      )
    count = len(
      np.stack(decoded)
    )  # the split's array, as the replaced decode_files built it
  elif loader == 'stream':
    from rotjax import batch_plans, streaming

    split = streaming.FileSplit(files, labels, size, workers=cores)
    count, marks = 0, []
    for batch in batch_plans.train_batches(
      split, opts['batch'], 0, 1, num_steps=opts.get('max_batches')
    ):
      marks.append(time.perf_counter() - t0)
      count += len(batch['label'])
    first = marks[0]
    # Steady state: the last three quarters of the epoch (worker start and ramp-up excluded).
    k = max(1, len(marks) // 4)
    steady = (len(marks) - k) * opts['batch'] / (marks[-1] - marks[k - 1])
  else:
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    import tensorflow as tf

    t0 = time.perf_counter()  # TensorFlow's import is not the loader's time

    def decode(path):
      image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
      shape = tf.cast(tf.shape(image)[:2], tf.float32)
      new_hw = tf.cast(
        tf.math.ceil(shape * size / tf.reduce_min(shape)), tf.int32
      )
      image = tf.image.resize(image, new_hw, method='bicubic', antialias=True)
      return tf.cast(
        tf.clip_by_value(
          tf.round(tf.image.resize_with_crop_or_pad(image, size, size)), 0, 255
        ),
        tf.uint8,
      )

    ds = tf.data.Dataset.from_tensor_slices(files).map(
      decode, num_parallel_calls=cores
    )
    options = tf.data.Options()
    options.threading.private_threadpool_size = cores
    ds = ds.with_options(options).batch(opts['batch']).prefetch(2)
    count = 0
    for batch in ds.as_numpy_iterator():
      first = first or time.perf_counter() - t0
      count += len(batch)
  seconds = time.perf_counter() - t0
  import resource

  return {
    'images': count,
    'seconds': seconds,
    'rate': count / seconds,
    'first_batch': first,
    'steady': steady,
    # Peak resident memory of this process and of its largest worker, GiB.
    'peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    'peak_worker_rss_gib': resource.getrusage(
      resource.RUSAGE_CHILDREN
    ).ru_maxrss
    / 2**20,
  }


# ---------------------------------------------------------------- loop vs bare step (child)


def loop_child(opts) -> dict:
  """images/s of the bare train step and of train_and_evaluate's epoch 2 per loader."""
  import jax
  from configs import imagenette
  from rotjax import (
    batch_plans,
    data_parallel,
    input_pipeline,
    metrics,
    run_state,
    steps,
    train,
  )
  from rotjax.cpu import platform as rj_platform

  rj_platform.configure()
  config = imagenette.get_config('supervised')
  config.data.source = f'folder:{DATASETS["ImageNette 224px"][0]}'
  config.batch_size, config.model.width = opts['batch'], opts['width']
  config.data.max_train_images = opts['batch'] * opts['steps']
  config.data.max_eval_images = opts['batch']
  config.progress, config.log_every_steps, config.num_epochs = (
    False,
    opts['steps'],
    2,
  )
  config.data.cache_dir = tempfile.mkdtemp()
  dp = data_parallel.DataParallel(config.parallel, jax.local_devices())
  results = {}
  datasets = {}
  for loader in ('memory', 'stream'):
    config.data.loader = loader
    datasets[loader] = input_pipeline.load_dataset(config.data)
  # The bare step: one batch, already sharded on the device, stepped `steps` times.
  state, mask, _, _ = run_state.create_train_state(
    config, datasets['memory'].num_classes, opts['steps']
  )
  step = steps.compiled_train_step(config, mask, dp)
  batch = next(
    batch_plans.train_batches(datasets['memory'].train, config.batch_size, 0, 1)
  )
  batch = dp.put_batch(batch)
  state, rng = dp.put(state), dp.put(jax.random.key(0))

  def bare():
    nonlocal state
    state, m = step(state, batch, rng)
    jax.block_until_ready(m)

  bare()  # compile
  for name in (
    'bare step',
    'loop, memory',
    'loop, stream',
    'bare step (again)',
  ):
    if name.startswith('bare'):
      t0 = time.perf_counter()
      for _ in range(opts['steps']):
        bare()
      results[name] = (
        opts['steps'] * config.batch_size / (time.perf_counter() - t0)
      )
    else:
      loader = name.split(', ')[1]
      with tempfile.TemporaryDirectory() as workdir:
        config.workdir = workdir
        train.train_and_evaluate(config, dataset=datasets[loader])
        results[name] = metrics.read_metrics(workdir)[-1]['images_per_second']
  return results


# ---------------------------------------------------------------- startup on a big folder


def _tree_memory(pid) -> tuple[int, int]:
  """(RSS of pid, PSS summed over pid and its descendants), bytes."""

  def children(p):
    try:
      with open(f'/proc/{p}/task/{p}/children') as f:
        kids = [int(c) for c in f.read().split()]
    except OSError:
      return []
    return kids + [g for k in kids for g in children(k)]

  def field(p, name, file):
    try:
      with open(f'/proc/{p}/{file}') as f:
        for line in f:
          if line.startswith(name):
            return int(line.split()[1]) * 1024
    except OSError:
      pass
    return 0

  return field(pid, 'VmRSS:', 'status'), sum(
    field(p, 'Pss:', 'smaps_rollup') for p in [pid] + children(pid)
  )


def startup(folder, stage, batch, seconds_after) -> dict:
  """Runs configs/imagenet.py:STAGE on `folder` until `seconds_after` past its first step."""
  workdir = tempfile.mkdtemp()
  cmd = [
    sys.executable,
    '-m',
    'rotjax.main',
    f'--config={ROOT}/configs/imagenet.py:{stage}',
    f'--config.data.source=folder:{folder}',
    f'--config.workdir={workdir}',
    f'--config.batch_size={batch}',
    '--config.log_every_steps=1',
  ]
  t0 = time.time()
  proc = subprocess.Popen(
    cmd,
    cwd=ROOT,
    stderr=subprocess.PIPE,
    stdout=subprocess.DEVNULL,
    text=True,
    env={**os.environ, 'PYTHONPATH': ROOT},
  )
  peak = {'rss': 0, 'pss': 0}
  events = {}

  def sample():
    while proc.poll() is None:
      rss, pss = _tree_memory(proc.pid)
      peak['rss'], peak['pss'] = max(peak['rss'], rss), max(peak['pss'], pss)
      time.sleep(0.25)

  threading.Thread(target=sample, daemon=True).start()
  log = []
  for line in proc.stderr:
    log.append(line)
    now = time.time() - t0
    if 'data loader:' in line and 'data' not in events:
      events['data'] = now
      events['loader'] = line.split('data loader: ', 1)[1].strip()
    if 'train step:' in line and 'first call' in line:
      events['first_step'] = now
      threading.Timer(seconds_after, proc.kill).start()
  proc.wait()
  if 'first_step' not in events:
    raise RuntimeError(
      'the run ended before its first step:\n' + ''.join(log[-30:])
    )
  return {
    **events,
    'peak_rss_gib': peak['rss'] / 2**30,
    'peak_pss_gib': peak['pss'] / 2**30,
    'command': ' '.join(cmd[1:]),
  }


# ---------------------------------------------------------------- the parent


def child(kind, opts) -> dict:
  out = subprocess.run(
    [
      sys.executable,
      os.path.abspath(__file__),
      '--child',
      kind,
      '--opts',
      json.dumps(opts),
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env={**os.environ, 'PYTHONPATH': ROOT},
  )
  if out.returncode:
    return {
      'error': out.stderr.strip().splitlines()[-1]
      if out.stderr.strip()
      else 'failed'
    }
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--child', help=argparse.SUPPRESS)
  parser.add_argument('--opts', help=argparse.SUPPRESS)
  parser.add_argument(
    '--parts', default='loaders,loop', help='loaders, loop, startup'
  )
  parser.add_argument(
    '--images',
    type=int,
    default=0,
    help='images per loader row (0: the whole train split: 50,000 CIFAR-10, '
    '9,469 ImageNette)',
  )
  parser.add_argument('--loop_batch', type=int, default=32)
  parser.add_argument('--loop_steps', type=int, default=30)
  parser.add_argument('--width', type=int, default=64)
  parser.add_argument(
    '--folder', help='ImageNet-layout folder for the startup part'
  )
  parser.add_argument('--startup_stage', default='supervised')
  parser.add_argument('--startup_batch', type=int, default=64)
  parser.add_argument('--json', default='data_benchmark.json')
  args = parser.parse_args(argv)
  if args.child:
    fn = {'loader': loader_child, 'loop': loop_child}[args.child]
    print(json.dumps(fn(json.loads(args.opts))))
    return
  from rotjax.cpu import isa

  cores = len(os.sched_getaffinity(0))
  print(f'{isa.cpu_model()} (class {isa.isa_class()}), {cores} cores available')
  parts = args.parts.split(',')
  out = {'cpu': isa.cpu_model(), 'cpu_class': isa.isa_class(), 'cores': cores}
  if 'loaders' in parts:
    core_counts = sorted({1, min(2, cores), cores})
    table = {}
    for name, (folder, split, size) in DATASETS.items():
      count = args.images or 10**9
      for loader in LOADERS:
        for n in core_counts:
          print(f'{name}: {loader} on {n} cores ...', flush=True)
          table[(name, loader, n)] = child(
            'loader',
            {
              'folder': folder,
              'split': split,
              'size': size,
              'images': count,
              'loader': loader,
              'cores': n,
              'batch': 128,
            },
          )
    print(
      '\nloaders alone: images/s over the whole pass, start included (x: against 1 core); '
      'stream: also its steady rate (the last 3/4 of the epoch) and the seconds to its '
      'first batch'
    )
    print(
      '| dataset | loader | '
      + ' | '.join(f'{n} core{"s" * (n > 1)}' for n in core_counts)
      + ' |'
    )
    print('| --- | --- |' + ' --- |' * len(core_counts))
    for name in DATASETS:
      for loader in LOADERS:
        cells = []
        for n in core_counts:
          r = table[(name, loader, n)]
          if 'error' in r:
            cells.append(f'error: {r["error"][:60]}')
            continue
          one = table[(name, loader, 1)].get('rate')
          cell = f'{r["rate"]:.0f}' + (
            f' ({r["rate"] / one:.2f}x)' if one and n > 1 else ''
          )
          if r.get('steady'):
            one_steady = table[(name, loader, 1)].get('steady')
            cell += f'; steady {r["steady"]:.0f}' + (
              f' ({r["steady"] / one_steady:.2f}x)'
              if one_steady and n > 1
              else ''
            )
          if r.get('first_batch'):
            cell += f'; first batch {r["first_batch"]:.1f} s'
          cells.append(cell)
        print(f'| {name} | {loader} | ' + ' | '.join(cells) + ' |')
    out['loaders'] = [
      {'dataset': k[0], 'loader': k[1], 'cores': k[2], **v}
      for k, v in table.items()
    ]
  if 'loop' in parts:
    print(
      f'\nloop vs bare step: ImageNette 224px, ResNet18 (ImageNet stem, width {args.width}), '
      f'batch {args.loop_batch}, {args.loop_steps} steps ...',
      flush=True,
    )
    loop = child(
      'loop',
      {'batch': args.loop_batch, 'steps': args.loop_steps, 'width': args.width},
    )
    if 'error' in loop:
      print(f'loop: error: {loop["error"]}')
    else:
      bare = (loop['bare step'] + loop['bare step (again)']) / 2
      for name, rate in loop.items():
        print(
          f'| {name} | {rate:.1f} images/s | {rate / bare:.1%} of the bare step |'
        )
    out['loop'] = loop
  if 'startup' in parts:
    if not args.folder:
      sys.exit(
        '--parts startup needs --folder (scripts/make_jpeg_folder.py writes one)'
      )
    alone = child(
      'loader',
      {
        'folder': args.folder,
        'split': 'train',
        'size': 256,
        'images': 10**9,
        'loader': 'stream',
        'cores': cores,
        'batch': 128,
        'max_batches': 100,
      },
    )
    if 'error' in alone:
      print(f'stream alone on {args.folder}: error: {alone["error"]}')
    else:
      print(
        f'stream alone, {args.folder} (every file listed; 100 batches of 128 at 256 px, '
        f'{cores} workers): {alone["rate"]:.0f} images/s ({alone["steady"]:.0f} steady), '
        f'peak RSS {alone["peak_rss_gib"]:.2f} GiB + {alone["peak_worker_rss_gib"]:.2f} GiB '
        'for the largest worker'
      )
    out['stream_alone'] = alone
    print(
      f'\nstartup: configs/imagenet.py:{args.startup_stage} on {args.folder} ...',
      flush=True,
    )
    result = startup(args.folder, args.startup_stage, args.startup_batch, 20)
    print(
      f'batch {args.startup_batch}: data ready {result["data"]:.1f} s after the start ({result["loader"]}); first train '
      f'step done {result["first_step"]:.1f} s after the start; peak memory: trainer RSS '
      f'{result["peak_rss_gib"]:.2f} GiB, trainer + workers PSS {result["peak_pss_gib"]:.2f} GiB'
    )
    out['startup'] = result
  with open(args.json, 'w') as f:
    json.dump(out, f, indent=2, default=str)
  print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
