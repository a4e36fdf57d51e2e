"""Compiled programs kept between processes: JAX's persistent compilation cache.

Without it every process compiles the same few programs again: stages 2 and 3 run
one program, stages 4 and 5 another, and so do every seed of a study cell and every
resume. On the H200 the train step took 72-74 s to compile and 2.6 s an epoch to
run (../shared/reference/gpu-first-run.md); on a 2-core CPU the model's init and
train step take about 11 s to compile (docs/performance.md).

`config.compile_cache` (or the environment variable ROTJAX_COMPILE_CACHE, which wins)
is 'auto' (<rotjax cache>/jit, where <rotjax cache> is $ROTJAX_CACHE or
~/.cache/rotjax), a folder, or '' / 0 / off to turn the cache off. Entries go into a
sub-folder per machine kind (`machine_key`): JAX's own key already holds the jax
version, backend and XLA flags, and the sub-folder adds what it leaves out and what a
shared home directory mixes, such as the CPU's instruction sets (XLA compiles for the
host CPU: a program built with AVX-512 dies with SIGILL on an AVX2-only machine).
A folder that cannot be written is a warning and the run compiles as before.
"""

import collections
import contextlib
import functools
import hashlib
import logging
import os
import re
import time

import jax

ENV = 'ROTJAX_COMPILE_CACHE'
_OFF = ('', '0', 'off', 'false', 'none', 'no')
# Programs that compile faster than this are not written: eager one-op programs would
# fill the folder, and loading them costs about what compiling them does.
MIN_COMPILE_SECONDS = 0.5
_HIT = '/jax/compilation_cache/cache_hits'
_MISS = '/jax/compilation_cache/cache_misses'

_enabled = {}  # 'path': the folder this process uses (None: off), 'reason'


def cache_root() -> str:
  """rotjax's cache folder ($ROTJAX_CACHE or ~/.cache/rotjax), shared with the oneDNN build."""
  return os.environ.get(
    'ROTJAX_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'rotjax')
  )


def _slug(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9.]+', '-', text).strip('-').lower() or 'unknown'


def cpu_features(cpuinfo: str = '/proc/cpuinfo') -> frozenset:
  """The CPU's features as /proc/cpuinfo lists them: x86's `flags` line, or aarch64's
  `Features` (where SVE, SVE2, bf16 and i8mm show); empty where there is neither (macOS)."""
  try:
    with open(cpuinfo) as f:
      for line in f:
        name, _, value = line.partition(':')
        if name.strip() in ('flags', 'Features'):
          return frozenset(value.split())
  except OSError:
    pass
  return frozenset()


def machine_key() -> str:
  """jax/jaxlib version, backend and device kind; on the CPU its instruction-set class
  and a digest of its features (a GPU program is compiled for the device kind)."""
  import jaxlib
  from rotjax.cpu import isa

  backend = jax.default_backend()
  parts = [
    f'jax{jax.__version__}',
    f'jaxlib{jaxlib.__version__}',
    backend,
    _slug(jax.devices()[0].device_kind),
  ]
  if backend == 'cpu':
    # On x86 the digest of `flags`, as before (existing caches stay valid); on aarch64, of
    # `Features`: without it every ARM CPU shared one folder, and an SVE program could
    # reach a CPU without SVE.
    flags = ' '.join(sorted(cpu_features()))
    parts += [isa.isa_class(), hashlib.sha256(flags.encode()).hexdigest()[:8]]
  return '-'.join(parts)


def resolve(setting: str) -> str | None:
  """The cache folder for `setting` (ROTJAX_COMPILE_CACHE wins), None when off."""
  value = os.environ.get(ENV, setting)
  value = '' if value is None else str(value).strip()
  if value.lower() in _OFF:
    return None
  root = (
    os.path.join(cache_root(), 'jit')
    if value == 'auto'
    else os.path.expanduser(value)
  )
  return os.path.join(os.path.abspath(root), machine_key())


def _writable(path: str) -> str:
  """'' where `path` can hold cache entries, else why not."""
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f'.write-test-{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
    return ''
  except OSError as e:
    return f'{type(e).__name__}: {e}'


def enable(setting: str = 'auto') -> str | None:
  """Turns on the persistent cache for this process (once); returns its folder or None.

  A folder set before by the caller (jax.config's jax_compilation_cache_dir, as a test
  harness or a user's own script does) is left as it is. Call before the first compile
  of the run: JAX reads the setting when it first compiles.
  """
  if _enabled:
    return _enabled['path']
  current = jax.config.jax_compilation_cache_dir
  if current:
    _enabled.update(path=current, reason='set by the caller')
    return current
  path = resolve(setting)
  if path is None:
    _enabled.update(
      path=None,
      reason=f'off (compile_cache={setting!r}, {ENV}='
      f'{os.environ.get(ENV, "<unset>")!r})',
    )
    return None
  problem = _writable(path)
  if problem:
    logging.warning(
      'compilation cache %s cannot be written (%s): every program is compiled '
      'afresh; set %s or config.compile_cache to another folder, or 0 to turn '
      'it off',
      path,
      problem,
      ENV,
    )
    _enabled.update(path=None, reason=f'not writable: {problem}')
    return None
  jax.config.update('jax_compilation_cache_dir', path)
  if (
    'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ
  ):  # JAX's own switch wins
    jax.config.update(
      'jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_SECONDS
    )
  _enabled.update(path=path, reason='on')
  logging.info('compilation cache: %s', path)
  return path


def status() -> dict:
  """{'path': folder or None, 'reason': why} (for run_info.json)."""
  return dict(_enabled) or {
    'path': None,
    'reason': 'not enabled in this process',
  }


class Watch:
  """Counts compilation-cache hits and misses and the seconds spent inside a `with` block."""

  def __init__(self):
    self.counts = collections.Counter()
    self.seconds = 0.0

  def _listener(self, event, **kwargs):
    if event in (_HIT, _MISS):
      self.counts[event] += 1

  def __enter__(self):
    jax.monitoring.register_event_listener(self._listener)
    self._start = time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self._start
    jax.monitoring.unregister_event_listener(self._listener)
    return False

  @property
  def source(self) -> str:
    """Where the block's programs came from."""
    hits, misses = self.counts[_HIT], self.counts[_MISS]
    if misses:
      where = (
        'saved to the compilation cache'
        if status().get('path')
        else 'cache off'
      )
      return (
        f'compiled ({where})'
        if not hits
        else f'{hits} loaded from the cache, {misses} compiled'
      )
    if hits:
      return 'loaded from the compilation cache'
    # No lookup at all: the cache is off, or JAX did not consult it (a program this process
    # had compiled already, or one JAX keeps out of the cache).
    return (
      'compiled, not cached'
      if not status().get('path')
      else 'compiled without a cache lookup'
    )


def log_first_call(fn, name: str, since: float | None = None):
  """`fn`, logging once how its first call (its compile, or its load from the cache, and
  its first run) went: 'train step: loaded from the compilation cache in 1.2 s', and how
  long after `since` (a time.time(), e.g. when the data was loaded) it was done."""
  done = []

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    if done:
      return fn(*args, **kwargs)
    with Watch() as watch:
      out = fn(*args, **kwargs)
      jax.block_until_ready(out)
    done.append(watch)
    after = (
      f'; done {time.time() - since:.1f} s after the data was loaded'
      if since
      else ''
    )
    logging.info(
      '%s: %s in %.1f s (first call, one step included%s)',
      name,
      watch.source,
      watch.seconds,
      after,
    )
    return out

  wrapper.first_call = done
  return wrapper


@contextlib.contextmanager
def logged(name: str):
  """Logs how long a block of compiles took and where its programs came from."""
  with Watch() as watch:
    yield watch
  logging.info('%s: %s in %.1f s', name, watch.source, watch.seconds)
