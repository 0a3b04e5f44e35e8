"""One run per workdir: a lock file that names its holder and outlives a crash harmlessly.

`WORKDIR/run.lock` is held with an exclusive `flock` for the whole run and records the
holder (pid, host, start time). The kernel drops a flock when its process dies, so a run
killed with SIGKILL never blocks the next one; the record it leaves behind is reported as a
stale lock taken over. A second process started on a running workdir is refused with the
holder named. Where flock is not enforced (some network filesystems), the record's pid is
still checked on the same host. Only process 0 of a multi-host run takes the lock.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import warnings

import jax

LOCK_FILE = 'run.lock'


class WorkdirLockedError(RuntimeError):
  """Another live process is running in this workdir."""


def _describe(holder: dict) -> str:
  return (f"pid {holder.get('pid')} on host {holder.get('host')!r}, started "
          f"{holder.get('started')}")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # exists, owned by someone else
    return True
  return True


class WorkdirLock:
  """Context manager: `with WorkdirLock(workdir): ...` holds the workdir for this process."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._file = None

  def _read_holder(self) -> dict:
    self._file.seek(0)
    text = self._file.read()
    try:
      return json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:   # a holder killed while writing its record
      return {}

  def acquire(self) -> None:
    os.makedirs(os.path.dirname(self.path) or '.', exist_ok=True)
    self._file = open(self.path, 'a+')
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      holder = self._read_holder()
      self._file.close()
      who = _describe(holder) if holder else 'a process that has not written its record yet'
      raise WorkdirLockedError(
          f'{os.path.dirname(self.path)} is in use by another run ({who}); wait for it, stop '
          f'it, or use another --workdir') from None
    previous = self._read_holder()
    me = {'pid': os.getpid(), 'host': socket.gethostname(),
          'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds')}
    if previous:
      same_host = previous.get('host') == me['host']
      if same_host and previous.get('pid') != me['pid'] and _pid_alive(previous.get('pid', -1)):
        # flock was granted but the recorded holder lives: the filesystem ignores flock.
        self._file.close()
        raise WorkdirLockedError(
            f'{os.path.dirname(self.path)} is in use by another run ({_describe(previous)}); '
            'wait for it, stop it, or use another --workdir')
      warnings.warn(f'taking over the stale lock of a run that did not exit cleanly '
                    f'({_describe(previous)}) in {os.path.dirname(self.path)}', stacklevel=2)
    self._file.seek(0)
    self._file.truncate()
    self._file.write(json.dumps(me))
    self._file.flush()
    os.fsync(self._file.fileno())

  def release(self) -> None:
    if self._file is None:
      return
    # An empty record says the last holder exited cleanly; the file itself stays, so a
    # waiting process never locks an unlinked inode.
    self._file.seek(0)
    self._file.truncate()
    self._file.flush()
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()
    self._file = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


def hold(workdir: str):
  """The workdir's lock on process 0 of the job; nothing on the other processes."""
  return WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
