"""A checkpoint written by 1 process on 8 devices resumes on 2 processes x 2 devices (gloo),
and theirs on 1 process x 8 again, continuing the loss curve of the uninterrupted run.

  .venv/bin/python experiments/sharding_matrix/restore_hosts.py [--keep=DIR]

Three CLI runs of configs/arithmetic_student.py:small,scratch (6 steps, a checkpoint every
2): straight through on 8 devices; a copy of it cut back to its step-2 checkpoint and
resumed by `distill.parallel.launch` as 2 processes x 2 devices (mesh data=4) to the end;
that cut back to its step-4 checkpoint and resumed on 8 devices. The workdir cut back is
what a job killed after that checkpoint leaves (tests/test_sharding_restore.rewind). Prints
the losses of both at steps 2, 4, 6 and exits 1 unless they agree (rtol 2e-5) and the
resumed runs kept the lines logged before each move.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from distill.parallel import launch  # noqa: E402  (the repository on the path first)
from tests.helpers import cli_env, read_metrics  # noqa: E402
from tests.test_sharding_restore import MARK, logged_losses, rewind  # noqa: E402

ARGS = ['-m', 'distill.main', '--config=configs/arithmetic_student.py:small,scratch',
        '--config.checkpoint_steps=2', '--config.keep_checkpoints=3',
        '--config.eval.generate=False']


def one_process(workdir: str):
  env = cli_env({'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
                 'JAX_PLATFORMS': 'cpu'})
  subprocess.run([sys.executable, *ARGS, '--config.mesh.data=8', f'--workdir={workdir}'],
                 cwd=REPO, env=env, check=True, capture_output=True, text=True)


def two_processes(workdir: str) -> str:
  with tempfile.TemporaryFile('w+') as out:
    procs = launch.start([*ARGS, '--config.mesh.data=-1', f'--workdir={workdir}'],
                         processes=2, devices_per_process=2, cwd=REPO,
                         env=cli_env({'JAX_PLATFORMS': 'cpu'}), stdout=out,
                         stderr=subprocess.STDOUT, text=True)
    status = launch.wait(procs)
    out.seek(0)
    printed = out.read()
  if status:
    raise SystemExit(f'the 2-process run failed ({status}):\n{printed[-3000:]}')
  return printed


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--keep', help='leave the workdirs here (default: a temporary folder)')
  args = parser.parse_args()
  root = args.keep or tempfile.mkdtemp(prefix='restore-hosts-')
  straight, moved = os.path.join(root, 'straight'), os.path.join(root, 'moved')
  one_process(straight)
  shutil.copytree(straight, moved)
  rewind(moved, 2)
  printed = two_processes(moved)          # steps 3-6 on 2 x 2 devices, from 8-device step 2
  assert 'over 4 devices in 2 process(es)' in printed, printed
  rewind(moved, 4)
  one_process(moved)                      # steps 5-6 on 8 devices, from the 2 x 2 step 4
  want, got = logged_losses(straight), logged_losses(moved)
  kept = [r['step'] for r in read_metrics(moved) if r.get(MARK)]
  print('step  8 devices straight  8 -> 2x2 -> 8')
  for (step, a), (_, b) in zip(want, got):
    print(f'{step:4d}  {a:.7f}  {b:.7f}')
  ok = ([s for s, _ in got] == [s for s, _ in want] == [2, 4, 6] and kept == [2, 4]
        and np.allclose([l for _, l in got], [l for _, l in want], rtol=2e-5, atol=0))
  print('same loss curve' if ok else f'DIFFERENT (lines kept from before the moves: {kept})')
  if not args.keep:
    shutil.rmtree(root, ignore_errors=True)
  sys.exit(0 if ok else 1)


if __name__ == '__main__':
  main()
