r"""Kill -9 drill: interrupted-and-resumed runs must end with the reference metrics.

  python scripts/fault_drill.py [--runs 4] [--seed 0] [--epochs 3] [--source folder:PATH]
                                [--loader stream --every 2] [--signals]

Runs a tiny CLI training uninterrupted (the reference), then --runs times: starts
the same command in a fresh workdir, kills it with SIGKILL at a seeded random
moment of its training (odd drills: any point of the training, evaluation or
checkpoint writes, startup aside) or while its k-th checkpoint write is in flight
(even drills, k seeded), reruns the same command to completion and compares its
metrics.jsonl with the reference. Timing columns aside, the rows must be
bit-identical: data order and random numbers are keyed on (seed, epoch, step) and
a resume restores the exact float32 state.
Columns: the committed checkpoint steps, uncommitted (tmp) step directories and
metrics rows the kill left, and the step the rerun resumed from. Without --source
a small image folder is generated. A few minutes on 2 CPU cores.

--signals (the streaming loader; docs/reliability-streaming.md) then drills each way
a run can be stopped from outside, at a seeded moment of its training: SIGTERM and
SIGINT sent to the whole process group (a scheduler, Ctrl-C), SIGKILL of the trainer
alone and of the whole group (`timeout -s KILL`), SIGKILL of one decoding worker (the
OOM killer). Columns: how the run ended (exit status, the named stop or error) and how
long after the signal, when its last process (decoding workers, resource tracker)
was gone, its /dev/shm files left then and after the rerun (the next stream removes
what a group SIGKILL leaves), the step the rerun resumed from, and its metrics.
"""

import argparse
import glob
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from rotjax import rundir, testing  # noqa: E402  (this checkout's)

SIGNAL_ROWS = (
  ('SIGTERM', 'group'),
  ('SIGINT', 'group'),
  ('SIGKILL', 'trainer'),
  ('SIGKILL', 'group'),
  ('SIGKILL', 'worker'),
)
# What each ending must say on stderr (None: a SIGKILL of the trainer says nothing).
NAMED = {
  'SIGTERM': 'stopped by SIGTERM',
  'SIGINT': 'stopped by SIGINT',
  'worker': 'DataWorkerError: a data loader worker process died',
}

TIMING = ('train_seconds', 'epoch_seconds', 'images_per_second')


def command(args, workdir):
  # The tests' tiny settings (rotjax/testing.py), in float32 as there, on args.config.
  tiny = [f'--config.{key}={value}' for key, value in testing.TINY.items()]
  return [
    sys.executable,
    '-m',
    'rotjax.main',
    f'--config={args.config}',
    *tiny,
    f'--config.workdir={workdir}',
    f'--config.data.source={args.source}',
    f'--config.num_epochs={args.epochs}',
    '--config.log_every_steps=1',
    f'--config.data.cache_dir={os.path.join(workdir, "cache")}',
    f'--config.data.loader={args.loader}',
    f'--config.checkpoint_every_steps={args.every}',
  ]


def environment(cache_dir):
  env = dict(os.environ)
  env.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  env['JAX_PLATFORMS'] = env.get('JAX_PLATFORMS', 'cpu')
  # Shared compilation cache: each of the many short runs would otherwise recompile.
  env['JAX_COMPILATION_CACHE_DIR'] = cache_dir
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  return env


def run_to_end(args, workdir, env) -> tuple[float, str]:
  t0 = time.time()
  proc = subprocess.run(
    command(args, workdir), cwd=ROOT, env=env, capture_output=True, text=True
  )
  if proc.returncode:
    sys.exit(
      f'run in {workdir} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}'
    )
  return time.time() - t0, proc.stderr


def tmp_checkpoints(workdir):
  """Orbax's uncommitted step directories: `<step>.orbax-checkpoint-tmp[-<time>]`."""
  return set(glob.glob(os.path.join(workdir, '*', '*.orbax-checkpoint-tmp*')))


def training_seconds(workdir) -> float:
  """From run_info.json (written just before the first step) to summary.json (the end)."""
  mtime = lambda name: os.path.getmtime(rundir.path(workdir, name))
  return mtime(rundir.SUMMARY) - mtime(rundir.RUN_INFO)


def run_and_kill(args, workdir, env, mode, at) -> str:
  """Starts the run and SIGKILLs it `at` seconds into training (time: startup, imports and
  compilation aside), or at the at-th checkpoint write seen (ckpt-write)."""
  proc = subprocess.Popen(
    command(args, workdir),
    cwd=ROOT,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  t0, seen, started = time.time(), set(), None
  while proc.poll() is None:
    if (
      mode == 'time'
      and started is None
      and os.path.exists(rundir.path(workdir, rundir.RUN_INFO))
    ):
      started = time.time()
    if mode == 'time' and started is not None and time.time() - started >= at:
      break
    if mode == 'ckpt-write':
      seen |= tmp_checkpoints(workdir)
      if len(seen) >= at:
        break
    if mode == 'time':
      time.sleep(
        0.005
      )  # A checkpoint write lasts ~0.1 s: poll for it without sleeping.
  if proc.poll() is not None:
    return f'finished first ({time.time() - t0:.1f}s)'
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  what = (
    f'{at:.2f}s into training'
    if mode == 'time'
    else f'write #{at} ({time.time() - t0:.1f}s)'
  )
  return f'killed at {what}'


def committed_steps(workdir):
  return [
    int(os.path.basename(d)) for d in rundir.step_dirs(workdir, rundir.LATEST)
  ]


def read_rows(workdir):
  path = rundir.path(workdir, rundir.METRICS)
  if not os.path.exists(path):
    return []
  rows = []
  for line in open(path):
    try:
      rows.append(
        {k: v for k, v in json.loads(line).items() if k not in TIMING}
      )
    except json.JSONDecodeError:
      rows.append({'torn line': line})
  return rows


def resumed_from(log: str) -> str:
  for line in log.splitlines():
    if 'resuming' in line and 'from step' in line:
      return line.rsplit('from step', 1)[1].strip()
  return 'scratch'


def _workers(pgid):
  pids = []
  for pid in testing.group_processes(pgid):
    try:
      if (
        pid != pgid
        and b'spawn_main' in open(f'/proc/{pid}/cmdline', 'rb').read()
      ):
        pids.append(pid)
    except OSError:
      pass
  return pids


def signal_drill(args, workdir, env, name, whom, at) -> dict:
  """Starts the run (a process group of its own), sends signal `name` to `whom` once it
  has trained `at` seconds (for a worker: once one is running), and watches it end."""
  proc = subprocess.Popen(
    command(args, workdir),
    cwd=ROOT,
    env=env,
    start_new_session=True,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  started = None
  while proc.poll() is None:
    if started is None and os.path.exists(
      rundir.path(workdir, rundir.RUN_INFO)
    ):
      started = time.time()
    if (
      started is not None
      and time.time() - started >= at
      and (whom != 'worker' or _workers(proc.pid))
    ):
      break
    time.sleep(0.005)
  if proc.poll() is not None:
    return {
      'ended': f'finished first (rc {proc.returncode})',
      'gone': '',
      'left': 0,
      'named': '',
    }
  files = testing.shm_files(testing.group_processes(proc.pid))
  sig = getattr(signal, name)
  t0 = time.time()
  if whom == 'group':
    os.killpg(proc.pid, sig)
  elif whom == 'worker':
    os.kill(_workers(proc.pid)[0], sig)
  else:
    os.kill(proc.pid, sig)
  try:
    _, err = proc.communicate(timeout=300)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    return {
      'ended': 'HUNG: killed after 300 s',
      'gone': '',
      'left': 0,
      'named': 'no',
    }
  ended = time.time() - t0
  while testing.group_processes(proc.pid) and time.time() - t0 < ended + 60:
    time.sleep(0.02)
  gone = time.time() - t0
  time.sleep(
    1.0
  )  # the resource tracker unlinks what the trainer left once its workers exit
  expected = NAMED.get(name if whom != 'worker' else 'worker')
  named = 'yes' if expected and expected in err else 'NO' if expected else '-'
  if 'leaked' in err:
    named += ' (leak warning)'
  return {
    'ended': f'rc {proc.returncode} in {ended:.1f}s',
    'gone': f'{gone:.1f}s'
    + (' ORPHANS' if testing.group_processes(proc.pid) else ''),
    'left': len(testing.still_there(files)),
    'files': files,
    'named': named,
  }


def run_signal_rows(args, base, env, rng, train_seconds, reference) -> int:
  """The --signals rows; returns how many ended as they must and resumed to the reference."""
  header = (
    f'{"run":>3}  {"signal":<16} {"at":>6} {"ended":<16} {"all gone":>9} {"shm left":>9}  '
    f'{"named":<6} {"resumed from":<12} result'
  )
  print(header)
  print('-' * len(header))
  good = 0
  for i, (name, whom) in enumerate(SIGNAL_ROWS, 1):
    workdir = os.path.join(base, f'signal-{i}')
    at = rng.uniform(0, train_seconds)
    row = signal_drill(args, workdir, env, name, whom, at)
    _, log = run_to_end(args, workdir, env)
    after = len(testing.still_there(row.get('files', ())))
    rows = read_rows(workdir)
    same = rows == reference
    ok = (
      same
      and after == 0
      and 'NO' not in row['named']
      and 'ORPHANS' not in row['gone']
    )
    good += ok
    left = f'{row["left"]}->{after}'
    print(
      f'{i:>3}  {name + " " + whom:<16} {at:>5.1f}s {row["ended"]:<16} {row["gone"]:>9} '
      f'{left:>9}  {row["named"]:<6} {resumed_from(log):<12} '
      f'{"identical" if same else "DIFFERENT"}{"" if ok else "  <- FAILED"}',
      flush=True,
    )
  print(
    f'{good}/{len(SIGNAL_ROWS)} signal rows ended cleanly and resumed identical to the reference'
  )
  return good


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--runs', type=int, default=4)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--epochs', type=int, default=3)
  parser.add_argument('--config', default='configs/supervised.py:smoke')
  parser.add_argument(
    '--source', default='', help='folder:PATH (default: a generated folder)'
  )
  parser.add_argument(
    '--workdir', default='', help='where the runs go (default: a temp dir)'
  )
  parser.add_argument(
    '--loader',
    default='auto',
    choices=('auto', 'memory', 'stream'),
    help='data.loader of every run',
  )
  parser.add_argument(
    '--every',
    type=int,
    default=0,
    help='checkpoint_every_steps: also checkpoint inside epochs',
  )
  parser.add_argument(
    '--signals',
    action='store_true',
    help='then the signal rows (SIGTERM, SIGINT, SIGKILL of the trainer, of '
    'the group, of a worker); needs --loader stream',
  )
  args = parser.parse_args()
  if args.signals and args.loader != 'stream':
    parser.error('--signals drills the streaming loader: add --loader stream')
  base = args.workdir or tempfile.mkdtemp(prefix='rotjax-fault-drill-')
  os.makedirs(base, exist_ok=True)
  if not args.source:
    args.source = 'folder:' + testing.make_image_folder(
      os.path.join(base, 'images')
    )
  env = environment(os.path.join(base, 'jit-cache'))
  rng = random.Random(args.seed)

  # The first run fills the compilation cache; the second, timed, sets the kill window.
  run_to_end(args, os.path.join(base, 'warmup'), env)
  ref_dir = os.path.join(base, 'reference')
  ref_seconds, _ = run_to_end(args, ref_dir, env)
  train_seconds = training_seconds(ref_dir)
  reference = read_rows(ref_dir)
  print(
    f'reference: {len(reference)} epochs in {ref_seconds:.1f}s ({train_seconds:.1f}s '
    f'training), final val_loss {reference[-1]["val_loss"]:.6f}, workdirs under {base}'
  )
  header = (
    f'{"run":>3}  {"kill":<30} {"at kill: ckpt steps":<20} {"tmp":>3} {"rows":>4}  '
    f'{"resumed from":<12} result'
  )
  print(header)
  print('-' * len(header))
  identical = 0
  for i in range(1, args.runs + 1):
    workdir = os.path.join(base, f'drill-{i}')
    if i % 2:
      mode, at = 'time', rng.uniform(0, train_seconds)
    else:
      mode, at = 'ckpt-write', rng.randint(1, args.epochs)
    killed = run_and_kill(args, workdir, env, mode, at)
    steps, rows_at_kill = committed_steps(workdir), len(read_rows(workdir))
    partial = len(tmp_checkpoints(workdir))
    _, log = run_to_end(args, workdir, env)
    rows = read_rows(workdir)
    same = rows == reference
    identical += same
    if same:
      result = 'identical'
    else:
      diff = [
        k for a, b in zip(rows, reference) for k in a if a.get(k) != b.get(k)
      ]
      result = f'DIFFERENT ({len(rows)} rows; keys {sorted(set(diff))})'
    print(
      f'{i:>3}  {killed:<30} {str(steps):<20} {partial:>3} {rows_at_kill:>4}  '
      f'{resumed_from(log):<12} {result}',
      flush=True,
    )
  print(f'{identical}/{args.runs} finished identical to the reference')
  ok = identical == args.runs
  if args.signals:
    print()
    ok &= run_signal_rows(
      args, base, env, rng, train_seconds, reference
    ) == len(SIGNAL_ROWS)
  sys.exit(0 if ok else 1)


if __name__ == '__main__':
  main()
