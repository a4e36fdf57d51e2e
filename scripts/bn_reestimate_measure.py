"""Stage 2 with freeze_bn=running and =reestimated from one pretext, at the :cpu study settings.

  python scripts/bn_reestimate_measure.py --study /tmp/study-cpu --out /tmp/bnre \
      --runs running:1 running:2 reestimated:0 reestimated:1 reestimated:2

The pretext is the study's seed-0 one (`configs/study.py:cpu`, run it first); each run is
the study's own stage 2 config (`sweep.run_config`: same images, epochs, dtype, seed of the
downstream run) with `freeze_bn` set, trained into OUT/seed<k>-<freeze_bn>. Prints one JSON
line per run with its summary (test accuracy at the best-validation epoch) and, for
reestimated, run_info's record of the pass. The linear probe's comparison is two commands:
`python -m rotjax.evaluate probe PRETEXT --layer=layer3 [--bn=reestimated]`.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rotjax.cpu import platform  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    '--study', required=True, help='the :cpu study folder holding the pretext'
  )
  parser.add_argument('--out', required=True)
  parser.add_argument(
    '--runs', nargs='+', required=True, help='FREEZE_BN:SEED ...'
  )
  args = parser.parse_args(argv)
  platform.configure()
  platform.quiet_library_logs()
  from configs import study
  from rotjax.study import sweep
  from rotjax import train

  config = study.get_config('cpu')
  config.workdir = args.study
  for spec in args.runs:
    freeze_bn, seed = spec.split(':')
    run = sweep.Run(
      2,
      'cifar10',
      'resnet18',
      4,
      0.1,
      0,
      int(seed),
      freeze_bn=freeze_bn,
      pretext_seed=config.pretext_seed,
    )
    run_config = sweep.run_config(config, run)
    run_config.workdir = os.path.join(args.out, f'seed{seed}-{freeze_bn}')
    summary = train.train_and_evaluate(run_config)
    with open(os.path.join(run_config.workdir, 'run_info.json')) as f:
      record = json.load(f).get('bn_reestimated')
    print(
      json.dumps(
        {
          'freeze_bn': freeze_bn,
          'seed': int(seed),
          **summary,
          'bn_reestimated': record,
        }
      ),
      flush=True,
    )


if __name__ == '__main__':
  main()
