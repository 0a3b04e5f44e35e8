"""Shared test utilities: tiny configs and running the CLI in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(workdir, *args, env=None, check=True, module='distill.main', timeout=600):
  """Runs `python -m distill.main --workdir=... ARGS` from the repo root."""
  cmd = [sys.executable, '-m', module, f'--workdir={workdir}', *args]
  full_env = dict(os.environ, **(env or {}))
  proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                        timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f'{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}')
  return proc


def read_metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def small_config(module, arg='small'):
  """Loads configs/MODULE.py's get_config(arg) the way the CLI does."""
  import importlib
  sys.path.insert(0, REPO)
  return importlib.import_module(f'configs.{module}').get_config(arg)
