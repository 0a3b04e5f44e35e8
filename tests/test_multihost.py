"""Several processes (jax.distributed over gloo CPU collectives): 2 processes x 2 devices train
the run of 1 process x 4 devices, each loading only its rows, and resume after a SIGKILL;
an unreachable coordinator is a message after the timeout."""
import os
import subprocess
import tempfile
import time

import grain
import numpy as np
import pytest

from distill.parallel import distributed, host_data, launch
from distill.train import trainer
from tests.helpers import REPO, read_metrics, run_cli, small_config

ARGS = ['-m', 'distill.main', '--config=configs/arithmetic_teacher.py:small',
        '--config.total_steps=8', '--config.checkpoint_steps=2', '--config.eval.generate=False']


def _launch(workdir, out):
  return launch.start([*ARGS, f'--workdir={workdir}'], processes=2, devices_per_process=2,
                      cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)


def _losses(workdir):
  return [(r['step'], r['loss']) for r in read_metrics(workdir) if 'loss' in r]


def test_two_processes_equal_one_and_resume_after_a_kill(tmp_path):
  single, two = str(tmp_path / 'single'), str(tmp_path / 'two')
  config = small_config('arithmetic_teacher')
  config.total_steps, config.checkpoint_steps, config.eval.generate = 8, 2, False
  config.mesh.data = 4          # the first 4 of this process's 8 devices
  trainer.train(config, single)

  with tempfile.TemporaryFile('w+') as out:
    procs = _launch(two, out)
    checkpoint = os.path.join(two, 'checkpoints', '2')
    deadline = time.monotonic() + 600
    while (all(p.poll() is None for p in procs) and not os.path.isdir(checkpoint)
           and time.monotonic() < deadline):
      time.sleep(0.01)
    for p in procs:
      p.kill()
      p.wait()
    out.seek(0)
    assert [p.returncode for p in procs] == [-9, -9], out.read()   # killed mid-run
  assert not os.path.exists(os.path.join(two, 'params'))

  with tempfile.TemporaryFile('w+') as out:
    status = launch.wait(_launch(two, out))
    out.seek(0)
    printed = out.read()
  assert status == 0, printed
  assert 'over 4 devices in 2 process(es)' in printed, printed   # one mesh over both
  want, got = _losses(single), _losses(two)
  assert [s for s, _ in got] == [s for s, _ in want] == [2, 4, 6, 8]   # process 0 logs once
  np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=2e-5)


def test_each_process_loads_its_rows_of_the_global_batch(monkeypatch):
  examples = grain.MapDataset.range(40)
  shares = []
  for index in range(2):
    monkeypatch.setattr(host_data.jax, 'process_count', lambda: 2)
    monkeypatch.setattr(host_data.jax, 'process_index', lambda i=index: i)
    shares.append(list(host_data.host_rows(examples, global_batch=8)))
  # Global batch j is process 0's rows of it, then process 1's: the single process's order.
  joined = [x for j in range(5) for share in shares for x in share[4 * j:4 * j + 4]]
  assert joined == list(range(40))
  assert shares[0][:4] == [0, 1, 2, 3] and shares[1][:4] == [4, 5, 6, 7]


def test_unreachable_coordinator_is_a_message_after_the_timeout(tmp_path):
  start = time.monotonic()
  proc = run_cli(str(tmp_path), '--config=configs/arithmetic_teacher.py:small',
                 f'--coordinator_address=127.0.0.1:{launch.free_port()}', '--num_processes=2',
                 '--process_id=1', '--distributed_timeout_s=2', check=False, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert 'did not accept a connection within 2 s' in proc.stderr, proc.stderr
  assert time.monotonic() - start < 60


@pytest.mark.parametrize('environ, expected', [
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'}, 'slurm'),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}, None),     # one task: a single process
    ({'TPU_WORKER_HOSTNAMES': 't1v-0,t1v-1'}, 'tpu'),
    ({'TPU_WORKER_HOSTNAMES': 'localhost'}, None),          # a single-host TPU VM
    ({}, None),
])
def test_cluster_environments_are_detected(environ, expected):
  assert distributed.detected_environment(environ) == expected


def test_partial_flags_are_refused():
  with pytest.raises(ValueError, match='go together'):
    distributed.initialize('127.0.0.1:1234', None, 0)
  with pytest.raises(ValueError, match='--process_id=2 is not in 0 .. --num_processes-1 = 1'):
    distributed.initialize('127.0.0.1:1234', 2, 2)
