"""model.conv=xla checks, resolves and traces a config without building or loading oneDNN.
Usage: xla_only.py IMAGE_FOLDER WORKDIR"""

import sys

import _path  # noqa: F401
import conftest
from rotjax import compute, config_checks
from rotjax.cpu import onednn_build

folder, workdir = sys.argv[1:3]
config = conftest.tiny_config('supervised', workdir, folder)
config.model.conv = 'xla'
config_checks.check_config(config)
resolved = compute.resolve(config.model)
config_checks.check_model(config, resolved)
print('CONV', resolved.conv)
print('LOADED', onednn_build.attempted())
