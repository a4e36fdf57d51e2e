"""The streaming loader (data.loader=stream) gives the memory loader's batches,
resumes inside an epoch exactly, and fails by name (bad files, dead workers)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from rotjax import batch_plans
from rotjax import image_files
from rotjax import input_pipeline
from rotjax import memory_loader
from rotjax import rundir
from rotjax import shared_ring
from rotjax import streaming
from rotjax import testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ('train_seconds', 'epoch_seconds', 'images_per_second')


def _datasets(image_folder, tmp_path, **overrides):
  config = tiny_config('supervised', tmp_path, image_folder, **overrides)
  config.data.loader = 'memory'
  memory = input_pipeline.load_dataset(config.data)
  config.data.loader = 'stream'
  config.data.workers = 2
  return memory, input_pipeline.load_dataset(config.data)


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.slow  # starts decoding worker processes
def test_stream_gives_the_memory_loaders_batches(image_folder, tmp_path):
  memory, stream = _datasets(image_folder, tmp_path)
  assert (memory.loader, stream.loader) == ('memory', 'stream')
  assert isinstance(stream.train, streaming.FileSplit) and len(
    stream.train
  ) == len(memory.train)
  for epoch in (2, 1):
    one = list(batch_plans.train_batches(memory.train, 8, 0, epoch))
    two = list(batch_plans.train_batches(stream.train, 8, 0, epoch))
    assert len(one) == len(two) == memory.steps_per_epoch(8)
    for a, b in zip(one, two):
      _assert_same(a, b)
  # From a step inside the epoch: that epoch's remaining batches (a resumed run's).
  tail = list(batch_plans.train_batches(stream.train, 8, 0, 1, start=2))
  assert len(tail) == len(one) - 2
  for a, b in zip(one[2:], tail):  # `one`: epoch 1's
    _assert_same(a, b)
  for split in ('val', 'test'):
    for a, b in zip(
      batch_plans.eval_batches(getattr(memory, split), 8, 3),
      batch_plans.eval_batches(getattr(stream, split), 8, 3),
    ):
      _assert_same(a, b)


@pytest.mark.slow  # starts decoding worker processes
def test_each_process_streams_the_rows_of_its_shard_as_memory_holds_them(
  image_folder, tmp_path
):
  """Two processes, one data shard each: process p's streamed split is its memory split,
  file for file, and gives its part of every global batch."""
  config = tiny_config('supervised', tmp_path, image_folder)
  for p in (0, 1):
    config.data.loader = 'memory'
    memory = input_pipeline.load_dataset(config.data, p, 2)
    config.data.loader, config.data.workers = 'stream', 1
    stream = input_pipeline.load_dataset(config.data, p, 2)
    assert (
      stream.shards == memory.shards == (p,) and stream.sizes == memory.sizes
    )
    for split in ('train', 'val', 'test'):
      assert len(getattr(stream, split)) == len(getattr(memory, split))
    for a, b in zip(
      batch_plans.train_batches(
        memory.train, 4, 0, 1, (p,), 7, first_index=4 * p
      ),
      batch_plans.train_batches(
        stream.train, 4, 0, 1, (p,), 7, first_index=4 * p
      ),
    ):
      _assert_same(a, b)


@pytest.mark.slow  # starts decoding worker processes
def test_memory_decode_in_worker_processes_equals_decode_in_this_one(
  image_folder, monkeypatch
):
  files, labels, _ = image_files.list_folder_split(image_folder, 'train')
  here = memory_loader.decode_files(files, labels, 16)
  monkeypatch.setattr(memory_loader, 'MIN_FILES_FOR_WORKERS', 0)
  workers = memory_loader.decode_files(files, labels, 16, workers=2)
  np.testing.assert_array_equal(here.images, workers.images)
  np.testing.assert_array_equal(here.labels, workers.labels)


def test_auto_streams_what_would_not_fit_comfortably():
  gib = 2**30
  # CIFAR-10 (60k at 32 px, 0.2 GiB) and ImageNette at 256 px (13.4k, 2.5 GiB) stay in
  # memory on a 24 GiB machine; ImageNet-100 (131k at 256 px, 24 GiB) streams.
  assert (
    input_pipeline.choose_loader('auto', 60_000, 32, 20 * gib)[0] == 'memory'
  )
  assert (
    input_pipeline.choose_loader('auto', 13_394, 256, 20 * gib)[0] == 'memory'
  )
  loader, why = input_pipeline.choose_loader('auto', 131_000, 256, 20 * gib)
  assert (
    loader == 'stream'
    and '24.0 GiB decoded' in why
    and '20.0 GiB available' in why
  )
  # On a small laptop ImageNette streams too.
  assert (
    input_pipeline.choose_loader('auto', 13_394, 256, 4 * gib)[0] == 'stream'
  )
  assert (
    input_pipeline.choose_loader('memory', 131_000, 256, gib)[0] == 'memory'
  )
  with pytest.raises(ValueError, match="data.loader='disk' is unknown"):
    input_pipeline.choose_loader('disk', 1, 1)


def test_streaming_an_unprepared_tfds_dataset_says_how_to_prepare_it(tmp_path):
  config = tiny_config('supervised', tmp_path, str(tmp_path))
  config.data.source, config.data.data_dir = (
    'tfds:cifar10',
    str(tmp_path / 'tfds'),
  )
  config.data.loader = 'stream'
  with pytest.raises(
    ValueError, match='tfds build cifar10 --file_format=array_record'
  ):
    input_pipeline.load_dataset(config.data)


def _tfds_dataset(image_folder, data_dir):
  """The tiny image folder as a prepared tfds dataset in ArrayRecord format (what
  `tfds build --file_format=array_record` leaves), its images PNG-encoded by tfds."""
  import tensorflow as tf
  import tensorflow_datasets as tfds

  features = tfds.features.FeaturesDict(
    {
      'image': tfds.features.Image(shape=(None, None, 3)),
      'label': tfds.features.ClassLabel(names=testing.CLASSES),
    }
  )
  splits = {}
  for split in ('train', 'test'):
    files, labels, _ = image_files.list_folder_split(image_folder, split)
    images = np.stack([np.asarray(Image.open(f).convert('RGB')) for f in files])
    splits[split] = tf.data.Dataset.from_tensor_slices(
      {'image': images, 'label': labels}
    )
  tfds.dataset_builders.store_as_tfds_dataset(
    'tiny_shapes',
    '1.0.0',
    features,
    splits,
    data_dir=str(data_dir),
    file_format='array_record',
  )
  return 'tiny_shapes'


@pytest.mark.slow
def test_a_prepared_tfds_dataset_streams_what_memory_loads(
  image_folder, tmp_path
):
  """tfds:NAME through tfds.data_source (ArrayRecord) gives the batches tfds.load does in
  memory, and both hold the pixels of the folder it was built from (tfds stores the
  records in its own order, so the folder's batches are not the same rows)."""
  name = _tfds_dataset(image_folder, tmp_path / 'tfds')
  datasets = {}
  for loader in ('memory', 'stream'):
    config = tiny_config('supervised', tmp_path, image_folder)
    config.data.source, config.data.data_dir = (
      f'tfds:{name}',
      str(tmp_path / 'tfds'),
    )
    config.data.loader, config.data.workers = loader, 2
    datasets[loader] = input_pipeline.load_dataset(config.data)
    assert datasets[loader].loader == loader
    assert datasets[loader].class_names == testing.CLASSES
  memory, stream = datasets['memory'], datasets['stream']
  for a, b in zip(
    batch_plans.train_batches(memory.train, 8, 0, 1),
    batch_plans.train_batches(stream.train, 8, 0, 1),
  ):
    _assert_same(a, b)
  for a, b in zip(
    batch_plans.eval_batches(memory.test, 8),
    batch_plans.eval_batches(stream.test, 8),
  ):
    _assert_same(a, b)
  files, labels, _ = image_files.list_folder_split(image_folder, 'test')
  key = lambda images, labels: sorted(
    (int(l), im.tobytes()) for im, l in zip(images, labels)
  )
  folder_images = [image_files.decode_image(f, 16) for f in files]
  assert key(memory.test.images, memory.test.labels) == key(
    folder_images, labels
  )


def _bad_folder(root):
  for split in ('train', 'test'):
    for name in ('a', 'b'):
      os.makedirs(root / split / name)
      for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(
          root / split / name / f'{i}.png'
        )
  (root / 'train' / 'a' / 'broken.jpg').write_bytes(b'not an image')
  return str(root)


@pytest.mark.slow  # starts decoding worker processes
def test_an_unreadable_file_is_named_or_masked_and_counted(tmp_path, caplog):
  root = _bad_folder(tmp_path / 'data')
  config = tiny_config(
    'supervised', tmp_path, root, **{'data.val_fraction': 0.0}
  )
  config.data.loader, config.data.workers = 'stream', 1
  dataset = input_pipeline.load_dataset(config.data)
  with pytest.raises(image_files.BadImageError, match='broken.jpg'):
    list(batch_plans.train_batches(dataset.train, 4, 0, 1))
  config.data.skip_bad_files = True
  dataset = input_pipeline.load_dataset(config.data)
  assert (
    len(dataset.train) == 9
  )  # the file keeps its place: every process sees one list
  batches = list(batch_plans.train_batches(dataset.train, 4, 0, 1))
  bad = dataset.train.files.index(
    os.path.join(root, 'train', 'a', 'broken.jpg')
  )
  plans = batch_plans.TrainPlan(9, 4, 0, 1)
  for i, batch in enumerate(batches):
    for j, row in enumerate(plans[i]['rows']):
      if row == bad:
        assert (
          batch['mask'][j] == 0 and batch['image'][j].any()
        )  # another image, weight 0
  assert sum(b['mask'].sum() for b in batches) == 8
  assert 'skipped 1 unreadable files' in caplog.text


@dataclasses.dataclass
class DyingSplit(streaming.FileSplit):
  """A split whose worker dies (as an out-of-memory kill would end it) at its third batch."""

  def gather(self, plan, out=None):
    if plan['rows'][0] >= 16:
      os.kill(os.getpid(), signal.SIGKILL)
    return super().gather(plan, out)


@pytest.mark.slow  # starts decoding worker processes
def test_both_loaders_skip_an_unreadable_file_alike(tmp_path):
  """With skip_bad_files the seeded val split is drawn from the file list by both loaders
  (an unreadable file keeps its row, weight 0), so the split and every batch are the same,
  and a resume that picks the other loader (data.loader=auto decides at each start) trains
  on what the first start did."""
  root = tmp_path / 'data'
  for split in ('train', 'test'):
    for c, name in enumerate(('a', 'b')):
      os.makedirs(root / split / name)
      for i in range(10):  # every image its own pixels: rows can be told apart
        Image.fromarray(np.full((8, 8, 3), 20 * i + c, np.uint8)).save(
          root / split / name / f'{i}.png'
        )
  (root / 'train' / 'a' / '05-broken.jpg').write_bytes(b'not an image')
  memory, stream = _datasets(
    str(root),
    tmp_path,
    **{'data.val_fraction': 0.25, 'data.skip_bad_files': True},
  )
  assert (memory.loader, stream.loader) == ('memory', 'stream')
  assert len(memory.train) == len(stream.train) and len(memory.val) == len(
    stream.val
  )
  assert (
    len(memory.train) + len(memory.val) == 21
  )  # the broken file keeps its row
  bad = os.path.join(str(root), 'train', 'a', '05-broken.jpg')
  weights = 0.0
  for name in ('train', 'val'):
    a, b = getattr(memory, name), getattr(stream, name)
    one = list(batch_plans.eval_batches(a, 4))
    two = list(batch_plans.eval_batches(b, 4))
    for x, y in zip(one, two, strict=True):
      _assert_same(x, y)
    weights += sum(x['mask'].sum() for x in one)
    if bad in b.files:  # the memory split marks the same row unreadable
      assert (
        not a.readable[b.files.index(bad)] and a.readable.sum() == len(a) - 1
      )
    else:
      assert a.readable is None
  assert weights == 20  # 21 rows, the unreadable one at weight 0
  for epoch in (1, 2):
    one = list(batch_plans.train_batches(memory.train, 4, 0, epoch))
    two = list(batch_plans.train_batches(stream.train, 4, 0, epoch))
    for x, y in zip(one, two, strict=True):
      _assert_same(x, y)


@pytest.mark.slow  # starts decoding worker processes
def test_a_dead_worker_is_a_named_error_not_a_hang(image_folder):
  files, labels, _ = image_files.list_folder_split(image_folder, 'train')
  split = DyingSplit(files, labels, 16, workers=2, name='tiny/train')
  t0 = time.time()
  with pytest.raises(
    streaming.DataWorkerError,
    match='worker process died while decoding tiny/train',
  ):
    list(batch_plans.eval_batches(split, 8))
  assert time.time() - t0 < 60


def _run(flags, **popen):
  env = testing.child_env(JAX_PLATFORMS='cpu')
  return subprocess.Popen(
    [sys.executable, '-m', 'rotjax.main', *flags],
    cwd=ROOT,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,
    **popen,
  )


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [
      {k: v for k, v in json.loads(line).items() if k not in TIMING}
      for line in f
    ]


@pytest.mark.slow
def test_sigkill_inside_an_epoch_resumes_to_the_unbroken_runs_metrics(
  image_folder, tmp_path
):
  """Kill -9 the trainer once a checkpoint inside an epoch is committed: its decoding
  workers end with it, and the rerun continues that epoch's batches and ends with the
  metrics of a run never killed, which are those of the memory loader."""
  common = {
    'num_epochs': 2,
    'checkpoint_every_steps': 2,
    'log_every_steps': 1,
    'data.workers': 2,
  }
  flags = lambda workdir, loader: testing.tiny_flags(
    'supervised', workdir, image_folder, **common, **{'data.loader': loader}
  )
  for loader in ('memory', 'stream'):
    proc = _run(flags(tmp_path / loader, loader))
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
  reference = _rows(tmp_path / 'memory')
  assert _rows(tmp_path / 'stream') == reference and len(reference) == 2

  killed = tmp_path / 'killed'
  proc = _run(flags(killed, 'stream'))
  steps_per_epoch = 7  # 54 training images at batch 8
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    steps = [
      int(os.path.basename(d))
      for d in rundir.step_dirs(str(killed), rundir.LATEST)
    ]
    if any(s % steps_per_epoch for s in steps if s > steps_per_epoch):
      break
    time.sleep(0.05)
  assert proc.poll() is None, (
    'the run ended before a checkpoint inside epoch 2 was written'
  )
  os.kill(
    proc.pid, signal.SIGKILL
  )  # the trainer alone: its decoding workers must follow
  proc.wait()
  for _ in range(100):
    try:
      os.killpg(proc.pid, 0)  # any process left in the run's group?
    except ProcessLookupError:
      break
    time.sleep(0.1)
  else:
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail('decoding workers outlived the killed trainer by 10 s')
  assert len(_rows(killed)) == 1  # killed inside epoch 2
  proc = _run(flags(killed, 'stream'))
  assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
  log = proc.stderr.read()
  assert 'resuming' in log and ' of epoch ' in log, log[
    -3000:
  ]  # "(step k of epoch e)"
  assert _rows(killed) == reference


def test_a_resume_inside_an_epoch_refuses_other_batches():
  saved = {
    'epoch': 2,
    'steps_done': 3,
    'steps_per_epoch': 7,
    'data': {
      'seed': 0,
      'num_shards': 1,
      'train_images': 54,
      'batch_size': 8,
      'loader': 'stream',
    },
  }
  now = {'seed': 0, 'num_shards': 1, 'train_images': 54, 'batch_size': 8}
  rundir._check_partial_epoch(
    saved, 7, now, '/w'
  )  # the loader may differ: same batches
  with pytest.raises(ValueError, match='seed 0 then, 1 now'):
    rundir._check_partial_epoch(saved, 7, {**now, 'seed': 1}, '/w')
  with pytest.raises(ValueError, match='7 steps per epoch, this run has 4'):
    rundir._check_partial_epoch(saved, 4, now, '/w')


@pytest.mark.slow
def test_imagenet_preset_study_streams_all_five_stages(tmp_path):
  """configs/imagenet.py:study,smoke on an ImageNet-layout folder (train/ and val/ of
  nXXXXXXXX class folders, JPEGs of mixed sizes), every stage streamed."""
  from configs import imagenet
  from rotjax.study import results
  from rotjax.study import runner

  root = tmp_path / 'imagenet'
  rng = np.random.default_rng(0)
  for split, count in (('train', 12), ('val', 4)):
    for c, kind in enumerate(testing.CLASSES):
      os.makedirs(root / split / f'n{c:08d}')
      for i in range(count):
        size = int(rng.integers(24, 60))
        Image.fromarray(testing.draw(kind, rng, size)).save(
          root / split / f'n{c:08d}' / f'{i}.JPEG'
        )
  config = imagenet.get_config('study,smoke')
  config.workdir = str(tmp_path / 'study')
  config.datasets.imagenet.source = f'folder:{root}'
  config.base.data.loader, config.base.data.workers = 'stream', 1
  config.base.data.val_fraction, config.base.data.max_train_images = 0.25, 0
  config.base.model.width, config.base.batch_size = 4, 8
  config.epochs = {'pretext': 1, 'finetune': 1, 'supervised': 1}
  runner.run_study_and_report(config)
  rows = results.collect(config.workdir)
  assert sorted((r['stage'], r['status']) for r in rows) == [
    (s, 'done') for s in range(1, 6)
  ]
  for row in rows:
    info = rundir.read_json(
      os.path.join(config.workdir, row['workdir'], 'run_info.json')
    )
    assert (
      info['data_loader']['loader'] == 'stream' and info['train_images'] == 27
    )


@pytest.mark.slow  # starts decoding worker processes
def test_memory_decode_in_workers_names_or_marks_an_unreadable_file(
  tmp_path, monkeypatch
):
  root = _bad_folder(tmp_path / 'data')
  files, labels, _ = image_files.list_folder_split(root, 'train')
  monkeypatch.setattr(
    memory_loader, 'MIN_FILES_FOR_WORKERS', 0
  )  # 8 px images: processes
  with pytest.raises(image_files.BadImageError, match='broken.jpg'):
    memory_loader.decode_files(files, labels, 8, workers=2)
  decoded = memory_loader.decode_files(
    files, labels, 8, skip_bad_files=True, workers=2
  )
  assert len(decoded) == 9 and decoded.readable.sum() == 8
  assert not decoded.readable[
    files.index(os.path.join(root, 'train/a/broken.jpg'))
  ]


def test_too_little_shared_memory_is_a_named_error_before_any_worker(
  tmp_path, monkeypatch
):
  # A container's /dev/shm with 64 KiB free (Docker's default is 64 MiB).
  monkeypatch.setattr(
    os,
    'statvfs',
    lambda path: os.statvfs_result((4096, 4096, 16, 16, 16, 0, 0, 0, 0, 255)),
  )
  with pytest.raises(
    MemoryError, match=r'needs \d+ MiB of shared memory .* /dev/shm has 0 MiB'
  ):
    shared_ring.check_shared_memory(2**30, 5)


@pytest.mark.slow
@pytest.mark.cpu_only('two processes on localhost with Gloo CPU collectives')
def test_two_processes_each_streaming_its_shard_train_as_one(
  image_folder, tmp_path
):
  """Two processes (one device each, Gloo), each streaming only its data shard's files, end
  with the metrics of one process holding both shards on two devices (the multi-host test's
  check, for data.loader=stream; the sums' order across processes moves the last digits)."""
  import socket

  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  settings = {
    'num_epochs': 2,
    'data.loader': 'stream',
    'data.workers': 1,
    'data.num_shards': 2,
  }

  def start(workdir, devices, *extra):
    env = testing.child_env(
      JAX_PLATFORMS='cpu',
      XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
    )
    return subprocess.Popen(
      [
        sys.executable,
        '-m',
        'rotjax.main',
        *testing.tiny_flags('supervised', workdir, image_folder, **settings),
        *extra,
      ],
      cwd=ROOT,
      env=env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )

  procs = [start(tmp_path / 'one', 2)] + [
    start(
      tmp_path / 'two',
      1,
      f'--config.distributed.coordinator_address=localhost:{port}',
      '--config.distributed.num_processes=2',
      f'--config.distributed.process_id={p}',
    )
    for p in (0, 1)
  ]
  for proc in procs:
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
  one, two = _rows(tmp_path / 'one'), _rows(tmp_path / 'two')
  assert len(one) == len(two) == 2
  for a, b in zip(one, two):
    for key in a:
      if key in ('dtype', 'conv', 'epoch', 'step'):
        assert a[key] == b[key], key
      else:
        assert a[key] == pytest.approx(b[key], abs=1e-4), key
