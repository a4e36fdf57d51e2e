"""Command line: python -m rotjax.study --config configs/study.py --config.workdir=DIR.

Trains the study's runs, then writes results.csv, report.md and the report's PNG figures
into DIR; its last line names them. The report is also rebuilt after every run that trained,
so an interrupted study has an up-to-date one. `python -m rotjax.report DIR` rebuilds it alone.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from rotjax.cpu import platform

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config',
  None,
  'Study config file, e.g. configs/study.py[:smoke|:cpu].',
  lock_config=True,
)
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  platform.quiet_library_logs()
  import jax  # After platform.configure(): XLA flags must be set before jax starts.
  from rotjax.study import runner

  logging.info('JAX %s, devices: %s', jax.__version__, jax.devices())
  print(runner.run_study_and_report(FLAGS.config), flush=True)


if __name__ == '__main__':
  platform.configure()
  app.run(main)
