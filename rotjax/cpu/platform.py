"""Process-level settings that must be in place before JAX starts (XLA flags, malloc)."""

import ctypes
import importlib.metadata
import logging
import os
import sys

# jaxlib 0.10 lowers every convolution to a YNNPACK fusion whose gradients are
# 2.5-3x slower than PyTorch's at CIFAR sizes; keeping individual convolutions
# out of it made the ResNet18 train step 1.6-1.7x faster on the 2-core CPU
# (docs/performance.md; the measurements behind it are in the study's shared
# reference, ../shared/reference/cpu-performance-notes.md, outside this repository).
# By default the convolutions go to oneDNN (onednn_conv.py); this still matters for
# model.conv=xla and for the convolutions oneDNN does not take. The flag is
# experimental and an unknown XLA flag aborts the process, so it is only set where it
# was verified.
_CPU_FLAGS = {
  '0.10': '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'
}


def cpu_xla_flags() -> str:
  try:
    version = importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return ''
  return _CPU_FLAGS.get('.'.join(version.split('.')[:2]), '')


# The glibc malloc settings below: (mallopt parameter from malloc.h, value, the
# environment variable that sets the same for a process glibc has yet to start).
_MALLOC_SETTINGS = (
  (-4, 0, 'MALLOC_MMAP_MAX_'),  # M_MMAP_MAX: no mmap per buffer
  (-1, -1, 'MALLOC_TRIM_THRESHOLD_'),  # M_TRIM_THRESHOLD: -1 = never trim
  (-8, 1, 'MALLOC_ARENA_MAX'),
)  # M_ARENA_MAX: one arena


def malloc_environment() -> dict:
  """keep_large_buffers_in_heap's settings as environment variables, for another program."""
  return {name: str(value) for _, value, name in _MALLOC_SETTINGS}


def keep_large_buffers_in_heap() -> bool:
  """glibc malloc: serve large buffers from the heap and keep freed memory for reuse.

  By default glibc mmaps every buffer over 32 MB afresh and unmaps it on free,
  so each train step page-faults its large activations again (a 33 MB
  elementwise op: 11 ms instead of 2.3 ms; docs/performance.md). With mmap
  off for allocations and no trimming, the step reuses the same pages. glibc
  also gives each thread that allocates its own arena, a separate mmap'd heap
  that it shrinks and grows again on its own terms; XLA's and oneDNN's worker
  threads each got one, so one arena keeps every buffer in the one untrimmed
  heap (the epoch's first step after evaluation and checkpointing had been
  0.5-1 s slower, and every step ~25% slower; docs/performance.md). "No
  trimming" has to mean -1: a ResNet18 step at batch 128 takes an 815 MB temp
  buffer, three of them were free at the top of the heap at times, and with the
  largest positive threshold (2 GB) glibc gave those back, so every 10-20 steps
  one step page-faulted 800 MB afresh and took 2-2.5 s instead of 0.7 s
  (Zen 5, bf16: mean step 849 ms over 60 steps, 787 ms with -1). The cost:
  memory freed by XLA stays with the process. Linux/glibc only; a no-op
  (False) elsewhere. ROTJAX_MALLOC_TUNING=0 turns it off.
  """
  if (
    not sys.platform.startswith('linux')
    or os.environ.get('ROTJAX_MALLOC_TUNING', '1') == '0'
  ):
    return False
  try:
    libc = ctypes.CDLL('libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # musl and other libcs have no mallopt
    return False
  return all(
    [bool(mallopt(param, value)) for param, value, _ in _MALLOC_SETTINGS]
  )


def configure() -> None:
  """The verified CPU settings, unless ROTJAX_DEFAULT_FLAGS=0: XLA flags and malloc
  tuning. Call before importing jax."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if os.environ.get('ROTJAX_DEFAULT_FLAGS', '1') == '0':
    return
  keep_large_buffers_in_heap()
  flags = cpu_xla_flags()
  current = os.environ.get('XLA_FLAGS', '')
  if flags and flags.split('=')[0] not in current:
    # Only the CPU backend reads --xla_cpu_* flags; GPU runs are unaffected.
    os.environ['XLA_FLAGS'] = (current + ' ' + flags).strip()


class _QuietLibraries(logging.Filter):
  """Drops INFO chatter of orbax and friends from the absl log (warnings still show)."""

  NOISY = ('/orbax/', '/etils/', '/tensorflow_datasets/')

  def filter(self, record):
    return record.levelno >= logging.WARNING or not any(
      n in record.pathname for n in self.NOISY
    )


def quiet_library_logs() -> None:
  """For the command lines: keep the absl log to what rotjax itself says."""
  from absl import logging as absl_logging

  absl_logging.get_absl_handler().addFilter(_QuietLibraries())
