"""Two local processes (jax.distributed over gloo CPU collectives) train one run together."""
import os
import socket
import subprocess
import sys

import numpy as np

from tests.helpers import REPO, read_metrics


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_train_one_run(tmp_path):
  workdir = str(tmp_path / 'run')
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'distill.main', '--config=configs/arithmetic_teacher.py:small',
       f'--workdir={workdir}', f'--coordinator_address=127.0.0.1:{port}',
       '--num_processes=2', f'--process_id={i}'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out
  metrics = read_metrics(workdir)
  train_steps = [r['step'] for r in metrics if 'loss' in r]
  assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 6   # process 0 writes once
  assert all(np.isfinite(r['loss']) for r in metrics if 'loss' in r)
  # One mesh spans the 4 devices of both processes.
  assert 'over 4 devices in 2 process(es)' in outputs[0], outputs[0]
  assert os.path.isdir(os.path.join(workdir, 'params'))
