"""One process of the multi-host test.

python tests/programs/multihost_worker.py FOLDER WORKDIR NPROC PID PORT [LATE_SECONDS [MODE]]
LATE_SECONDS: process 1 reaches the first train step (the first collective) that long
after process 0 has reached it, as a process does that compiles slowly or loads its data
late. "Reached" is read off process 0's run_info.json, written right before its first step.
MODE: config.parallel (auto, jit or pmap).
"""

import os
import sys
import time

folder, workdir, nproc, pid, port = sys.argv[1:6]
nproc, pid = int(nproc), int(pid)
late = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
mode = sys.argv[7] if len(sys.argv) > 7 else 'auto'
# 2 CPU devices in all, split over the processes: 1 process x 2 or 2 processes x 1.
os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={2 // nproc}'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from conftest import tiny_config  # noqa: E402
from rotjax import parallel, steps, train  # noqa: E402

config = tiny_config('supervised', workdir, folder, num_epochs=2)
config.parallel = mode
# Two data shards either way: one process holds both, or each process reads one.
config.data.num_shards = 2
if nproc > 1:
  config.distributed.coordinator_address = f'localhost:{port}'
  config.distributed.num_processes = nproc
  config.distributed.process_id = pid
parallel.initialize_distributed(config.distributed)
assert jax.device_count() == 2 and jax.process_count() == nproc, jax.devices()
if pid == 1 and late:
  build = steps.compiled_train_step

  def build_late(*args, **kwargs):
    """Building the train step is the last thing before the first step: wait there until
    process 0 is at its first step, then `late` seconds more."""
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(workdir, 'run_info.json')):
      if time.time() > deadline:
        raise TimeoutError('process 0 never reached its first train step')
      time.sleep(0.2)
    time.sleep(late)
    return build(*args, **kwargs)

  steps.compiled_train_step = build_late
print('SUMMARY', train.train_and_evaluate(config), flush=True)
parallel.shutdown_distributed()
