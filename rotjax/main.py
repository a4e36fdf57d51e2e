"""Command line: python -m rotjax.main --config configs/STAGE.py --config.workdir=DIR."""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from rotjax.cpu import platform

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config',
  None,
  'Stage config file, e.g. configs/finetune.py[:smoke|:cpu].',
  lock_config=True,
)
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  platform.quiet_library_logs()
  import jax  # After platform.configure(): XLA flags must be set before jax starts.
  from rotjax import parallel

  parallel.initialize_distributed(
    FLAGS.config.distributed
  )  # Before anything touches devices.
  from rotjax import train

  from rotjax import stopping

  logging.info('JAX %s, devices: %s', jax.__version__, jax.devices())
  try:
    summary = train.train_and_evaluate(FLAGS.config)
  except (
    stopping.Stopped
  ) as e:  # SIGTERM or SIGINT: a clean stop, exit status as the shell's
    logging.error('%s', e)
    sys.exit(128 + e.signum)
  logging.info('summary: %s', summary)
  parallel.shutdown_distributed()


if __name__ == '__main__':
  platform.configure()
  app.run(main)
