"""Process-level settings that must be in place before JAX starts (XLA flags)."""
import importlib.metadata
import logging
import os

# jaxlib 0.10 lowers every convolution to a YNNPACK fusion whose gradients are
# 2.5-3x slower than PyTorch's at CIFAR sizes; keeping individual convolutions
# out of it made the ResNet18 train step 1.6-1.7x faster on the 2-core CPU
# (cpu-performance-notes.md, scripts/benchmark.py). The flag is experimental and
# an unknown XLA flag aborts the process, so it is only set where it was verified.
_CPU_FLAGS = {'0.10': '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'}


def cpu_xla_flags() -> str:
  try:
    version = importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return ''
  return _CPU_FLAGS.get('.'.join(version.split('.')[:2]), '')


def configure() -> None:
  """Adds the verified CPU XLA flags unless ROTJAX_DEFAULT_FLAGS=0. Call before importing jax."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if os.environ.get('ROTJAX_DEFAULT_FLAGS', '1') == '0':
    return
  flags = cpu_xla_flags()
  current = os.environ.get('XLA_FLAGS', '')
  if flags and flags.split('=')[0] not in current:
    # Only the CPU backend reads --xla_cpu_* flags; GPU runs are unaffected.
    os.environ['XLA_FLAGS'] = (current + ' ' + flags).strip()


class _QuietLibraries(logging.Filter):
  """Drops INFO chatter of orbax and friends from the absl log (warnings still show)."""
  NOISY = ('/orbax/', '/etils/', '/tensorflow_datasets/')

  def filter(self, record):
    return record.levelno >= logging.WARNING or not any(n in record.pathname for n in self.NOISY)


def quiet_library_logs() -> None:
  """For the command lines: keep the absl log to what rotjax itself says."""
  from absl import logging as absl_logging
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())
