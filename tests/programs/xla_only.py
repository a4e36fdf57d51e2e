"""model.conv=xla checks and describes a config without building or loading oneDNN.
Usage: xla_only.py IMAGE_FOLDER WORKDIR"""
import sys

import _path  # noqa: F401
import conftest
from rotjax import config_checks
from rotjax.cpu import hardware, onednn_build

folder, workdir = sys.argv[1:3]
config = conftest.tiny_config('supervised', workdir, folder)
config.model.conv = 'xla'
config_checks.check_config(config)
print('CONV', hardware.describe(config.model)['conv'])
print('LOADED', onednn_build.attempted())
