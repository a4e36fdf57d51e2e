"""Two processes on localhost (CPU, gloo collectives) train like one process with both devices.

Both runs use two data shards: the one process holds both, each of the two
processes decodes and feeds only its own. About 100 s on 2 CPU cores.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from rotjax import metrics
from rotjax import testing

pytestmark = pytest.mark.cpu_only(
  'two processes on localhost with Gloo CPU collectives'
)

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _run(folder, workdir, nproc, late=0.0, mode='auto'):
  port = _free_port()
  env = testing.child_env()
  env.pop('XLA_FLAGS', None)
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        os.path.join(HERE, 'programs', 'multihost_worker.py'),
        folder,
        str(workdir),
        str(nproc),
        str(i),
        str(port),
        str(late),
        mode,
      ],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=env,
    )
    for i in range(nproc)
  ]
  try:
    outs = [p.communicate(timeout=400)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['jit', 'pmap'])
def test_two_processes_match_one_process(image_folder, tmp_path, mode):
  """Under jit the batch is one global array made of each process's rows, the state a
  global array that Orbax saves as it is; under pmap each process feeds its devices."""
  _run(image_folder, tmp_path / 'one', 1, mode=mode)
  # Process 1 reaches the first step 31 s after process 0: more than the 30 s a Gloo
  # context set-up waits for (the lateness is what is tested, not a wait for readiness).
  _run(image_folder, tmp_path / 'two', 2, late=31.0, mode=mode)
  with open(tmp_path / 'two' / 'run_info.json') as f:
    assert json.load(f)['parallel'] == mode
  one = metrics.read_metrics(str(tmp_path / 'one'))
  two = metrics.read_metrics(str(tmp_path / 'two'))
  assert [r['epoch'] for r in two] == [1, 2]
  for a, b in zip(one, two):
    for key in (
      'train_loss',
      'val_loss',
      'test_loss',
      'val_accuracy',
      'test_accuracy',
    ):
      np.testing.assert_allclose(
        a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key
      )
  # Process 0 alone wrote the logs; Orbax committed the checkpoints once.
  assert os.path.exists(tmp_path / 'two' / 'config.json')
  assert sorted(os.listdir(tmp_path / 'two' / 'checkpoints')) == sorted(
    os.listdir(tmp_path / 'one' / 'checkpoints')
  )
