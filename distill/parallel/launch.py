"""Starts N local processes of one multi-process job: what tests (and a laptop) use in place
of a cluster's launcher.

    python -m distill.parallel.launch --processes=2 --devices_per_process=2 -- \\
        -m distill.main --config=configs/arithmetic_teacher.py:small --workdir=runs/two

Each process runs `python ARGS --coordinator_address=127.0.0.1:PORT --num_processes=N
--process_id=i` with `devices_per_process` CPU devices (XLA's host platform device count;
accelerators are unaffected). Their output is this process's. When one process fails the
others are stopped, so a job never waits on a dead peer; the exit status is the first
failure's (0 when all succeed).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start(args: list[str], processes: int, devices_per_process: int, *, cwd=None,
          env=None, **popen_kwargs) -> list[subprocess.Popen]:
  """The job's processes, started (process 0 first: it serves as the coordinator)."""
  port = free_port()
  env = dict(os.environ if env is None else env,
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices_per_process}')
  return [subprocess.Popen(
      [sys.executable, *args, f'--coordinator_address=127.0.0.1:{port}',
       f'--num_processes={processes}', f'--process_id={i}'], cwd=cwd, env=env, **popen_kwargs)
      for i in range(processes)]


def wait(procs: list[subprocess.Popen], poll_s: float = 0.2) -> int:
  """Waits for every process; the first to fail stops the rest. Returns the exit status."""
  failed = 0
  while any(p.poll() is None for p in procs):
    failed = failed or next((p.returncode for p in procs if p.poll() not in (None, 0)), 0)
    if failed:
      for p in procs:
        if p.poll() is None:
          p.terminate()
      break
    time.sleep(poll_s)
  for p in procs:
    p.wait()
  return failed or next((p.returncode for p in procs if p.returncode), 0)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m distill.parallel.launch',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--processes', type=int, default=2)
  parser.add_argument('--devices_per_process', type=int, default=1)
  parser.add_argument('args', nargs=argparse.REMAINDER,
                      help='after --: the python arguments of each process')
  ns = parser.parse_args(argv)
  args = ns.args[1:] if ns.args[:1] == ['--'] else ns.args
  if ns.processes < 1 or ns.devices_per_process < 1 or not args:
    parser.error('--processes and --devices_per_process must be >= 1, and the process '
                 'arguments follow --')
  procs = start(args, ns.processes, ns.devices_per_process)
  # A launcher stopped by SIGTERM stops its processes too.
  signal.signal(signal.SIGTERM, lambda *_: [p.terminate() for p in procs])
  return wait(procs)


if __name__ == '__main__':
  sys.exit(main())
