"""Reliability under faults: a second job on a workdir, a stale lock, non-finite steps,
torn checkpoints and caches, a dead tracker, a full disk. The heavy version (many random
kills per data regime) is `make faults` (experiments/faults/run.py)."""
import os
import signal
import subprocess
import sys
import warnings

import pytest

from distill.train import lock as lock_lib
from distill.train import trainer
from tests.helpers import REPO, run_cli, small_config

STUDENT = '--config=configs/arithmetic_student.py:small,scratch'


@pytest.fixture
def lock_holder(tmp_path):
  """A separate live process holding tmp_path's workdir lock; SIGKILLed at the end."""
  code = ('import sys, time; from distill.train import lock; '
          'lock.WorkdirLock(sys.argv[1]).acquire(); print("held", flush=True); time.sleep(600)')
  proc = subprocess.Popen([sys.executable, '-c', code, str(tmp_path)], cwd=REPO,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == 'held'
  yield proc
  proc.kill()
  proc.wait()


def test_second_job_on_a_workdir_is_refused_naming_the_holder(tmp_path, lock_holder):
  with pytest.raises(lock_lib.WorkdirLockedError, match=f'pid {lock_holder.pid} on host'):
    trainer.train(small_config('arithmetic_student', 'small,scratch'), str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints')   # refused before touching anything
  proc = run_cli(str(tmp_path), STUDENT, check=False)
  assert proc.returncode == 2 and f'pid {lock_holder.pid}' in proc.stderr, proc.stderr
  assert 'Traceback' not in proc.stderr


def test_stale_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, lock_holder):
  lock_holder.send_signal(signal.SIGKILL)
  lock_holder.wait()
  with pytest.warns(UserWarning, match=f'stale lock .*pid {lock_holder.pid}'):
    with lock_lib.WorkdirLock(str(tmp_path)):
      pass
  # Released cleanly: the next holder has nothing to warn about.
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    with lock_lib.WorkdirLock(str(tmp_path)):
      pass


def test_record_of_a_live_holder_refuses_even_where_flock_is_not_enforced(tmp_path):
  """A record naming a live pid on this host (a filesystem without flock) refuses too."""
  import json
  import socket
  with open(tmp_path / lock_lib.LOCK_FILE, 'w') as f:
    json.dump({'pid': os.getppid(), 'host': socket.gethostname(), 'started': 'earlier'}, f)
  with pytest.raises(lock_lib.WorkdirLockedError, match=f'pid {os.getppid()}'):
    lock_lib.WorkdirLock(str(tmp_path)).acquire()
