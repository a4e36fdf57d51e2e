"""SIGTERM and SIGINT end training by name: the data stream and its workers are closed on the
way out and the message names the checkpoint the same command resumes from."""

import functools
import os
import signal
import threading

from rotjax import rundir


class Stopped(KeyboardInterrupt):
  """Training ended by SIGTERM or SIGINT, its data workers released and its checkpoints
  intact: the same command resumes it from the latest. `signum`: the signal."""

  def __init__(self, signum: int, message: str = ''):
    super().__init__(message or f'stopped by {signal.Signals(signum).name}')
    self.signum = signum

  def __reduce__(self):
    return Stopped, (self.signum, str(self))


def stops_on_signals(fn):
  """SIGTERM (a scheduler's stop) and SIGINT (Ctrl-C) raise Stopped where `fn` is: the
  `finally` blocks on the way out close the data stream and its workers, and the message
  names the checkpoint a rerun resumes from. A second signal gets the previous handler
  (SIGTERM's default ends the process at once). Only in the main thread, and only where
  the handlers are Python's defaults: a caller's own are left alone."""

  @functools.wraps(fn)
  def wrapper(config, *args, **kwargs):
    if threading.current_thread() is not threading.main_thread():
      return fn(config, *args, **kwargs)
    previous = {}

    def handler(signum, frame):
      for sig, old in previous.items():
        signal.signal(sig, old)
      raise Stopped(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
      if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
        previous[sig] = signal.signal(sig, handler)
    try:
      return fn(config, *args, **kwargs)
    except Stopped as e:
      workdir = rundir.absolute(config.workdir)
      saved = rundir.step_dirs(workdir, rundir.LATEST)
      where = (
        f'step {os.path.basename(saved[-1])}'
        if saved
        else 'the start (no checkpoint yet)'
      )
      raise Stopped(
        e.signum,
        f'training in {workdir} stopped by {signal.Signals(e.signum).name}; '
        f'its data workers are stopped and its checkpoints intact: the same command '
        f'resumes it from {where}',
      ) from None
    finally:
      for sig, old in previous.items():
        signal.signal(sig, old)

  return wrapper
