"""What `auto` picks for bf16 convolutions here, and whether model.conv=onednn is refused
before training (by compute.resolve, at the start). Usage: conv_choice.py IMAGE_FOLDER WORKDIR"""

import sys

import _path  # noqa: F401
import conftest
from rotjax import compute
from rotjax.cpu import onednn_errors

folder, workdir = sys.argv[1:3]
config = conftest.tiny_config('supervised', workdir, folder)
config.model.dtype = 'bfloat16'
config.model.conv = 'auto'
info = compute.resolve(config.model).record()
print('AUTO', info['conv'], info['conv_reason'])
config.model.conv = 'onednn'
try:
  compute.resolve(config.model)
  print('ACCEPTED')
except onednn_errors.OneDNNConvError as e:
  print('REFUSED', e)
