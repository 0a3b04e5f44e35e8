"""Command line: `python -m distill.main --config=configs/NAME.py[:ARG] --workdir=DIR`.

Any config field can be overridden with `--config.a.b=value`; `--import=FILE.py` (repeatable)
loads a researcher's own divergences and methods first (distill.plugins). Starting the same
command again resumes from the workdir's last checkpoint. On several hosts, start the same
command on each with --coordinator_address, --num_processes and --process_id; in a SLURM step
of several tasks or on a multi-host TPU VM slice they come from the environment
(distill.parallel.distributed; BUILD.md has the launch commands).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from distill import plugins
from distill.parallel import distributed
from distill.train import checkpoint as ckpt_lib
from distill.train import lock as lock_lib
from distill.train import logging as log_lib
from distill.train import trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (hosts).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process (0 .. num_processes-1).')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Join a multi-process job whose cluster jax detects by itself (e.g. a '
    'TPU VM slice whose environment names no workers).')
_DISTRIBUTED_TIMEOUT = flags.DEFINE_float(
    'distributed_timeout_s', 300, 'Seconds to wait for the coordinator and the other processes.')
_IMPORT = flags.DEFINE_multi_string(
    'import', [], 'A module name or .py file to import first (it may register divergences '
    'and methods); repeatable.')
flags.mark_flags_as_required(['config', 'workdir'])

USER_ERRORS = (AttributeError, KeyError, ValueError, FileNotFoundError, ImportError,
               lock_lib.WorkdirLockedError, log_lib.NonFiniteLossError,
               ckpt_lib.DiskSpaceError, distributed.CoordinatorTimeout)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  start_processes()
  trainer.train(_CONFIG.value, _WORKDIR.value)


def start_processes():
  """Quiet library logs, import --import modules and, on several hosts, join the
  jax.distributed job."""
  log_lib.quiet_libraries()
  plugins.import_all(_IMPORT.value)
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         auto=_DISTRIBUTED.value, timeout_s=_DISTRIBUTED_TIMEOUT.value)


def run(main_fn=main):
  try:
    app.run(main_fn)
  except USER_ERRORS as e:
    if os.environ.get('DISTILL_TRACEBACK'):
      raise
    # Config and input errors are for the user to fix: the message, not a traceback.
    # One-argument errors print their message bare (a KeyError's without quotes); an OSError's
    # args are (errno, text), so its str names the file.
    message = e.args[0] if len(e.args) == 1 else e
    print(f'error: {message}\n(set DISTILL_TRACEBACK=1 for the traceback)', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  run()
