"""Shared test utilities: tiny configs and running the CLI in a subprocess."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The runs the tests start are tiny, so compiling dominates them: XLA's backend optimisation
# is off for them and they share one persistent compilation cache (tests/conftest.py).
FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'


def cli_env(env=None) -> dict:
  """The environment of a CLI run started by a test: this one, compiling fast and cached,
  updated with `env`."""
  full = dict(os.environ)
  full['XLA_FLAGS'] = f'{full.get("XLA_FLAGS", "")} {FAST_COMPILE}'
  full.update({'JAX_COMPILATION_CACHE_DIR': full.get('DISTILL_TEST_COMPILE_CACHE', ''),
               'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
               'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'})
  full.update(env or {})
  return full


def run_cli(workdir, *args, env=None, check=True, module='distill.main', timeout=600):
  """Runs `python -m distill.main --workdir=... ARGS` from the repo root."""
  cmd = [sys.executable, '-m', module, f'--workdir={workdir}', *args]
  proc = subprocess.run(cmd, cwd=REPO, env=cli_env(env), capture_output=True, text=True,
                        timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f'{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}')
  return proc


def run_cli_killed(workdir, *args, checkpoint_step: int | None = None, when=None,
                   delay_s: float = 0.0, poll_s: float = 0.01, env=None, module='distill.main',
                   timeout=600) -> subprocess.CompletedProcess:
  """Starts the CLI and SIGKILLs it `delay_s` seconds after checkpoint `checkpoint_step` is on
  disk, or after `when()` first returns true (polled every `poll_s`); returncode is -9 when
  the kill landed before the run finished."""
  cmd = [sys.executable, '-m', module, f'--workdir={workdir}', *args]
  if when is None:
    # Orbax renames a step's directory into place once the step is complete.
    target = os.path.join(workdir, 'checkpoints', str(checkpoint_step))
    when = lambda: os.path.isdir(target)
  # Files, not pipes: nothing reads a pipe while this polls, and a full one would block.
  out, err = tempfile.TemporaryFile('w+'), tempfile.TemporaryFile('w+')
  proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(env), stdout=out,
                          stderr=err, text=True)
  deadline = time.monotonic() + timeout
  while proc.poll() is None and not when() and time.monotonic() < deadline:
    time.sleep(poll_s)
  kill_at = time.monotonic() + delay_s
  while proc.poll() is None and time.monotonic() < kill_at:
    time.sleep(min(poll_s, delay_s))
  if proc.poll() is None:
    proc.send_signal(signal.SIGKILL)
  proc.wait()
  stdout, stderr = (f.seek(0) or f.read() for f in (out, err))
  if proc.returncode not in (0, -signal.SIGKILL):
    raise AssertionError(f'{cmd} failed ({proc.returncode}):\n{stderr}')
  return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def read_metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_half(path):
  """Damage as a write killed half-way leaves it."""
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def flip_middle_byte(path):
  """Damage no size check sees: the middle byte inverted."""
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0xFF]))


def largest_file(directory):
  """The largest file under `directory` but its checksum record (an array's data)."""
  files = [os.path.join(r, n) for r, _, names in os.walk(directory) for n in names
           if n != 'checksums.json']
  return max(files, key=os.path.getsize)


def small_config(module, arg='small'):
  """Loads configs/MODULE.py's get_config(arg) the way the CLI does."""
  import importlib
  sys.path.insert(0, REPO)
  return importlib.import_module(f'configs.{module}').get_config(arg)
