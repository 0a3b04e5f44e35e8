"""Joining a multi-process JAX job (one process per host, or per GPU): from flags, or from
the environment of a SLURM job step or a Cloud TPU VM slice.

`jax.distributed.initialize` aborts the whole process (a C++ check failure) when a process
cannot register with the coordinator in time. So a process other than 0 first waits, up to the
timeout, for the coordinator's port to accept connections, and otherwise raises
CoordinatorTimeout naming the address: a message after the timeout, never a hang or an abort.
"""
from __future__ import annotations

import os
import socket
import time

import jax


class CoordinatorTimeout(TimeoutError):
  """The coordinator (process 0) did not accept a connection within the timeout."""


def detected_environment(environ=os.environ) -> str | None:
  """'slurm' (an srun step of several tasks), 'tpu' (a multi-host TPU VM slice), or None."""
  if 'SLURM_JOB_ID' in environ and int(environ.get('SLURM_NTASKS', '1')) > 1:
    return 'slurm'
  hosts = environ.get('TPU_PROCESS_ADDRESSES') or environ.get('TPU_WORKER_HOSTNAMES') or ''
  if len([h for h in hosts.split(',') if h]) > 1:
    return 'tpu'
  return None


def wait_for_coordinator(address: str, timeout_s: float, poll_s: float = 0.5) -> None:
  """Returns once host:port accepts a TCP connection; CoordinatorTimeout after timeout_s."""
  host, _, port = address.rpartition(':')
  if not host or not port.isdigit():
    raise ValueError(f'--coordinator_address={address!r}: expected host:port')
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip('[]'), int(port)), timeout=poll_s):
        return
    except OSError:
      if time.monotonic() >= deadline:
        raise CoordinatorTimeout(
            f'the coordinator {address} (process 0) did not accept a connection within '
            f'{timeout_s:g} s: is process 0 running, and is the address reachable from this '
            'host? (--distributed_timeout_s sets the wait)') from None
      time.sleep(poll_s)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False,
               timeout_s: float = 300) -> str | None:
  """Joins the job and returns how ('flags', 'slurm', 'tpu', 'auto'); None: a single process.

  Flags win; without them a SLURM step of several tasks or a multi-host TPU slice is joined
  through jax's own detection of it, as is any cluster jax detects when `auto` is set.
  """
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if None in explicit:
      raise ValueError('--coordinator_address, --num_processes and --process_id go together '
                       f'(got {coordinator_address!r}, {num_processes!r}, {process_id!r})')
    if not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id={process_id} is not in 0 .. --num_processes-1 '
                       f'= {num_processes - 1}')
    # CPU devices need a collectives library across processes (no effect on accelerators).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    if process_id != 0:
      wait_for_coordinator(coordinator_address, timeout_s)
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=int(timeout_s))
    return 'flags'
  how = detected_environment() or ('auto' if auto else None)
  if how:
    jax.distributed.initialize(initialization_timeout=int(timeout_s))
  return how
