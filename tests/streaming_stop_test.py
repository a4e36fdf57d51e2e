"""Every way a stream ends (data.loader=stream) releases its workers, its ring and
its semaphores within seconds, and a stopped run resumes; docs/reliability-streaming.md
has the table these tests check row by row.

Each test bounds its wait and fails instead of hanging the suite, and checks that the
processes ended, how long that took, and that no /dev/shm file of the run is left.
"""

import contextlib
import dataclasses
import gc
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from rotjax import batch_plans
from rotjax import image_files
from rotjax import rundir
from rotjax import shared_ring
from rotjax import streaming
from rotjax import testing

# Every test here starts decoding worker processes (or whole runs): seconds each.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = 5.0  # seconds: "released promptly"
LEAK = 'leaked'  # the resource tracker's warning at exit: "There appear to be N leaked ..."


def _split(image_folder, split_class=streaming.FileSplit):
  files, labels, _ = image_files.list_folder_split(image_folder, 'train')
  return split_class(files, labels, 16, workers=2, name='tiny/train')


def _bounded(fn, seconds=120.0):
  """fn() in a thread; a test failure, not a hung suite, if it takes over `seconds`."""
  out = {}

  def run():
    try:
      out['value'] = fn()
    except BaseException as e:  # noqa: B036 (KeyboardInterrupt included: it is the test's)
      out['error'] = e

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(seconds)
  if thread.is_alive():
    for (
      child
    ) in multiprocessing.active_children():  # this test's workers: unblock it
      os.kill(child.pid, signal.SIGKILL)
    pytest.fail(f'still running after {seconds:.0f} s')
  if 'error' in out:
    raise out['error']
  return out.get('value')


class _Watch:
  """What a stream started: its worker processes and the /dev/shm files they and this
  process opened (files this process had open before are not the stream's)."""

  def __init__(self):
    self.before_children = set(multiprocessing.active_children())
    self.before_files = testing.shm_files([os.getpid()])
    self.workers, self.files = [], set()

  def seen(self):
    self.workers = [
      p
      for p in multiprocessing.active_children()
      if p not in self.before_children
    ]
    pids = [os.getpid()] + [p.pid for p in self.workers]
    self.files = testing.shm_files(pids) - self.before_files

  def assert_released(self, since, within=PROMPT):
    """Workers gone and files removed within `within` seconds of `since`; returns seconds."""
    assert len(self.workers) == 2 and any(
      n.startswith('rotjax-') for n, _ in self.files
    )
    while time.time() - since < within and any(
      p.is_alive() for p in self.workers
    ):
      time.sleep(0.02)
    took = time.time() - since
    assert not any(p.is_alive() for p in self.workers), (
      f'workers alive {took:.1f} s on'
    )
    assert testing.still_there(self.files) == [], 'left in /dev/shm'
    return took


def _first_then(split, ending):
  """Takes a batch, lets the workers fill the ring and wait on it (1 s), then ends the
  stream as `ending` says; returns (watch, the time it was ended: its cleanup comes after)."""
  watch, at = _Watch(), {}
  plan = batch_plans.EvalPlan(len(split), 4)  # 18 batches, 5 ring slots
  if ending == 'break':
    for _ in streaming.stream(split, plan):
      watch.seen()
      time.sleep(1.0)
      at['end'] = time.time()
      break  # CPython drops the generator here, and closing it ends the stream
    return watch, at['end']
  if ending in ('error', 'KeyboardInterrupt'):
    error = (
      ValueError('a failed training step')
      if ending == 'error'
      else KeyboardInterrupt()
    )

    def consume():
      for _ in streaming.stream(split, plan):
        watch.seen()
        time.sleep(1.0)
        at['end'] = time.time()
        raise error

    try:
      consume()
    except (ValueError, KeyboardInterrupt):
      pass  # handled: the traceback (and the frame holding the generator) goes
    return watch, at['end']
  gen = streaming.stream(split, plan)
  next(gen)
  watch.seen()
  time.sleep(1.0)
  if ending == 'exhausted':
    for _ in gen:
      at['end'] = (
        time.time()
      )  # the last batch: the stream ends as the next one is asked for
    return watch, at['end']
  at['end'] = time.time()
  if ending == 'close':
    gen.close()
  elif ending == 'garbage collection':
    cycle = {'gen': gen}
    cycle['self'] = cycle
    del gen, cycle
    gc.collect()
  return watch, at['end']


@pytest.mark.parametrize(
  'ending',
  [
    'exhausted',
    'close',
    'break',
    'garbage collection',
    'error',
    'KeyboardInterrupt',
  ],
)
def test_each_way_a_stream_ends_releases_it_within_seconds(
  image_folder, ending
):
  split = _split(image_folder)
  t0 = time.time()
  watch, ended = _bounded(lambda: _first_then(split, ending))
  took = watch.assert_released(ended)
  # Closed after 3 s with the workers blocked on the ring: it used to hang (no return in 60 s).
  print(
    f'{ending}: released {took:.2f} s after the end ({time.time() - t0:.1f} s in all)'
  )


def test_a_closed_stream_returns_at_once_where_grain_joined_forever(
  image_folder,
):
  """One batch, 3 s for the workers to fill the ring, close: it used to hang."""
  split = _split(image_folder)
  gen = streaming.stream(split, batch_plans.EvalPlan(len(split), 4))
  watch = _Watch()
  _bounded(lambda: next(gen))
  watch.seen()
  time.sleep(3.0)
  t0 = time.time()
  _bounded(gen.close, 60)
  took = time.time() - t0
  assert took < PROMPT
  watch.assert_released(t0)
  print(f'closed in {took:.2f} s')


@dataclasses.dataclass
class DyingSplit(streaming.FileSplit):
  """A split whose worker dies (as an out-of-memory kill ends it) at the fifth batch, once
  the batches it decoded before have reached the queue to this process."""

  def gather(self, plan, out=None):
    if plan['rows'][0] == 32:
      time.sleep(0.5)
      os.kill(os.getpid(), signal.SIGKILL)
    return super().gather(plan, out)


@pytest.mark.parametrize('fault', ['dead worker', 'corrupt file'])
def test_a_failing_worker_is_a_named_error_and_releases_the_rest(
  image_folder, tmp_path, fault
):
  if fault == 'dead worker':
    split, error, match = (
      _split(image_folder, DyingSplit),
      streaming.DataWorkerError,
      'worker process died',
    )
  else:
    files, labels, _ = image_files.list_folder_split(image_folder, 'train')
    broken = tmp_path / 'broken.jpg'
    broken.write_bytes(b'\xff\xd8 a truncated JPEG')
    files[36] = str(
      broken
    )  # in the fifth batch (rows 32-39), the first worker's
    split = streaming.FileSplit(files, labels, 16, workers=2, name='tiny/train')
    error, match = image_files.BadImageError, 'broken.jpg'
  watch = _Watch()

  def consume():
    gen = streaming.stream(split, batch_plans.EvalPlan(len(split), 8))
    next(gen)
    watch.seen()
    with pytest.raises(error, match=match):
      list(gen)
    return time.time()

  t0 = time.time()
  ended = _bounded(consume, 60)
  assert (
    ended - t0 < 15
  )  # the fifth batch's error, named (it used to run 240 s without a word)
  took = watch.assert_released(ended)
  print(
    f'{fault}: {error.__name__} {ended - t0:.1f} s after the start, released {took:.2f} s on'
  )


def test_leftovers_of_a_killed_run_are_removed_and_nothing_else(
  tmp_path, monkeypatch, caplog
):
  """remove_leftovers on a folder standing in for /dev/shm: the ring and semaphores of a
  process that is gone go; a live process's, another program's semaphore, and a ring some
  process still holds stay, the last named with the command that ends its holders."""
  gone = subprocess.Popen(['true'])
  gone.wait()  # its pid: a process that no longer exists
  prefix = shared_ring.ring_prefix()
  ring, held = (
    tmp_path / f'{prefix}{gone.pid}-0000aaaa',
    tmp_path / f'{prefix}{gone.pid}-0000bbbb',
  )
  sem = tmp_path / f'sem.{prefix}{gone.pid}-mp-k2f0x9zz'
  live = [
    tmp_path / f'{prefix}{os.getpid()}-0000cccc',
    tmp_path / f'sem.{prefix}{os.getpid()}-mp-a',
  ]
  other = [
    tmp_path / 'sem.mp-a1b2c3d4',
    tmp_path / f'rotjax-1-{gone.pid}-0000dddd',
  ]  # other namespace
  for path in (ring, held, sem, *live, *other):
    path.write_bytes(b'\0' * 32)
  monkeypatch.setattr(
    shared_ring, 'mapped_inodes', lambda pids=None: {held.stat().st_ino: [4242]}
  )
  assert sorted(shared_ring.remove_leftovers(str(tmp_path))) == sorted(
    map(str, (ring, sem))
  )
  assert all(p.exists() for p in (held, *live, *other))
  assert (
    f'{held}, left by a killed run, is still open by processes 4242'
    in caplog.text
  )
  assert 'end them with `kill 4242`' in caplog.text


def test_a_streaming_process_names_its_semaphores_after_itself(image_folder):
  from multiprocessing import synchronize

  # A library may name this process's semaphores its own way first: loky (through
  # scikit-learn's t-SNE, in the same test process) replaces SemLock._make_name, or sets the
  # prefix; rotjax leaves either alone, and only the default is checked here.
  if synchronize.SemLock._make_name.__module__ != 'multiprocessing.synchronize':
    pytest.skip('another library (loky) names the semaphores in this process')
  before = multiprocessing.current_process()._config.get('semprefix', '/mp')
  expected = (
    f'/{shared_ring.ring_prefix()}{os.getpid()}-mp-'
    if before == '/mp'
    else before
  )
  split = _split(image_folder)
  gen = streaming.stream(split, batch_plans.EvalPlan(len(split), 4))
  _bounded(lambda: next(gen))
  lock = multiprocessing.get_context('spawn').Lock()
  try:
    name = lock._semlock.name
    assert name.startswith(expected), name
  finally:
    del lock
    _bounded(gen.close)


# ---------------------------------------------------------------- whole processes


def _env(**extra):
  return testing.child_env(JAX_PLATFORMS='cpu', **extra)


def _start(args, **popen):
  """A child in a process group of its own (the signals a scheduler or Ctrl-C send)."""
  return subprocess.Popen(
    [sys.executable, *args],
    cwd=ROOT,
    env=_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,
    **popen,
  )


def _wait(proc, seconds):
  """(returncode, stdout, stderr), the whole group killed and the test failed past `seconds`."""
  try:
    out, err = proc.communicate(timeout=seconds)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, err = proc.communicate()
    pytest.fail(f'still running after {seconds} s:\n{err[-3000:]}')
  return proc.returncode, out, err


def _group_gone(pgid, since, within=PROMPT) -> float:
  """Seconds from `since` until process group `pgid` has no live process (its decoding
  workers, its resource tracker); kills what is left and fails past `within`."""
  while testing.group_processes(pgid) and time.time() - since < within:
    time.sleep(0.02)
  left = testing.group_processes(pgid)
  if left:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(pgid, signal.SIGKILL)
    pytest.fail(f'processes {left} still alive {within} s on')
  return time.time() - since


# A script importing rotjax at its top (the orphan case: spawn re-imports it in each
# worker before the worker knows its parent), streaming with its consumer stalled.
STALLED = r"""
import sys, time
from rotjax import batch_plans, input_pipeline, streaming, image_files
KEEP = []
if __name__ == '__main__':
  files, labels, _ = image_files.list_folder_split(sys.argv[1], 'train')
  split = streaming.FileSplit(files, labels, 16, workers=2, name='tiny/train')
  KEEP.append(batch_plans.eval_batches(split, 4))
  next(KEEP[0])
  print('streaming', flush=True)
  time.sleep(float(sys.argv[2]))   # the workers fill the ring and wait on it
"""


def _stalled(tmp_path, image_folder, seconds):
  script = tmp_path / 'stalled.py'
  script.write_text(STALLED)
  proc = _start([str(script), image_folder, str(seconds)])
  assert proc.stdout.readline().strip() == 'streaming', _wait(proc, 60)[2][
    -3000:
  ]
  time.sleep(1.0)
  pids = testing.group_processes(proc.pid)
  files = testing.shm_files(pids)
  assert len(pids) == 4 and any(
    n.startswith('rotjax-') for n, _ in files
  )  # + 2 workers, tracker
  return proc, files


@pytest.mark.slow
def test_exit_with_a_stream_open_releases_it(image_folder, tmp_path):
  proc, files = _stalled(tmp_path, image_folder, 3.0)
  returncode, _, err = _wait(proc, 60)
  ended = time.time()
  assert returncode == 0, err[-3000:]
  _group_gone(proc.pid, ended)
  assert LEAK not in err and 'Exception ignored' not in err, err[-3000:]
  assert testing.still_there(files) == []


@pytest.mark.slow
@pytest.mark.parametrize('whom', ['trainer', 'group'])
def test_sigkill_leaves_no_worker_and_the_next_stream_removes_the_rest(
  image_folder, tmp_path, whom
):
  """SIGKILL of the process alone: its workers follow within about a second and its
  resource tracker unlinks the rest. Of the whole group (`timeout -s KILL`, a scheduler):
  nothing is left running, and the ring and semaphores, whose tracker died too, are
  removed by the next stream to start."""
  proc, files = _stalled(tmp_path, image_folder, 300)
  t0 = time.time()
  if whom == 'trainer':
    os.kill(proc.pid, signal.SIGKILL)
  else:
    os.killpg(proc.pid, signal.SIGKILL)
  _wait(proc, 30)
  took = _group_gone(proc.pid, t0)
  if whom == 'trainer':
    while testing.still_there(files) and time.time() - t0 < PROMPT:
      time.sleep(0.05)  # the tracker unlinks them once the workers are gone
    assert testing.still_there(files) == [], f'{took:.1f} s'
    return
  assert testing.still_there(
    files
  )  # what the killed tracker would have unlinked
  removed = shared_ring.remove_leftovers()  # what the next stream does first
  assert testing.still_there(files) == []
  assert {os.path.basename(p) for p in removed} >= {n for n, _ in files}


def _run(workdir, image_folder, **overrides):
  settings = {
    'num_epochs': 1,
    'data.loader': 'stream',
    'data.workers': 2,
    'checkpoint_every_steps': 2,
    'log_every_steps': 1,
    **overrides,
  }
  return _start(
    [
      '-m',
      'rotjax.main',
      *testing.tiny_flags('supervised', workdir, image_folder, **settings),
    ]
  )


def _files_once_checkpointed(proc, workdir):
  """The run's /dev/shm files once its first checkpoint is committed (training underway)."""
  deadline = time.time() + 300
  while proc.poll() is None and time.time() < deadline:
    if rundir.step_dirs(str(workdir), rundir.LATEST):
      return testing.shm_files(testing.group_processes(proc.pid))
    time.sleep(0.02)
  pytest.fail(f'no checkpoint: {_wait(proc, 60)[2][-3000:]}')


@pytest.mark.slow
@pytest.mark.parametrize(
  'sig', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT']
)
def test_a_signal_is_a_named_stop_that_the_same_command_resumes(
  image_folder, tmp_path, sig
):
  """SIGTERM (a scheduler) and SIGINT (Ctrl-C) sent to the whole process group, as they
  are: the trainer stops its workers (which leave SIGINT to it; SIGTERM ends them, and the
  trainer's handler runs before it could be told of dead workers), says which step the
  same command resumes from, exits 128 + the signal, and that command does."""
  workdir = tmp_path / 'run'
  proc = _run(workdir, image_folder)
  files = _files_once_checkpointed(proc, workdir)
  t0 = time.time()
  os.killpg(proc.pid, sig)
  returncode, _, err = _wait(proc, 60)
  took = time.time() - t0
  assert returncode == 128 + sig, err[-3000:]
  assert f'stopped by {sig.name}' in err and 'resumes it from step ' in err, (
    err[-3000:]
  )
  assert took < PROMPT, f'{took:.1f} s'
  _group_gone(proc.pid, t0)
  assert LEAK not in err, err[-3000:]
  assert testing.still_there(files) == []
  step = err.split('resumes it from step ')[1].split()[0]
  returncode, _, err = _wait(_run(workdir, image_folder), 600)
  assert returncode == 0, err[-3000:]
  assert f'from step {step} (step {step} of epoch 1)' in err, err[-3000:]
  assert rundir.read(str(workdir), rundir.SUMMARY)['epochs'] == 1


@pytest.mark.slow
@pytest.mark.parametrize(
  'fault', ['non-finite loss', 'corrupt file', 'dead worker']
)
def test_a_streamed_run_exits_with_its_named_error(
  image_folder, tmp_path, fault
):
  """The memory loader's named errors, streamed: no hang, no leak warning, nothing left."""
  workdir, source, overrides = tmp_path / 'run', image_folder, {}
  if fault == 'non-finite loss':
    overrides, expected = (
      {'optim.learning_rate': 1e30},
      'FloatingPointError: non-finite loss',
    )
  elif fault == 'corrupt file':
    source = str(tmp_path / 'images')
    testing.make_image_folder(source)
    with open(os.path.join(source, 'train', 'circle', 'broken.jpg'), 'wb') as f:
      f.write(b'\xff\xd8 a truncated JPEG')
    expected = 'BadImageError: cannot read image ' + os.path.join(
      source, 'train', 'circle'
    )
  else:  # two epochs: 14 batches, more than the ring lets the workers decode ahead of step 2
    overrides, expected = (
      {'num_epochs': 2},
      'DataWorkerError: a data loader worker process died',
    )
  proc = _run(workdir, source, **overrides)
  files = set()
  if fault == 'dead worker':
    files = _files_once_checkpointed(proc, workdir)
    worker = [
      p
      for p in testing.group_processes(proc.pid)
      if p != proc.pid and 'spawn_main' in open(f'/proc/{p}/cmdline').read()
    ][0]
    os.kill(worker, signal.SIGKILL)  # as the OOM killer would
  returncode, _, err = _wait(proc, 300)
  ended = time.time()
  assert returncode == 1 and expected in err, err[-3000:]
  _group_gone(proc.pid, ended)
  assert LEAK not in err, err[-3000:]
  assert testing.still_there(files) == []
