"""Metrics out of the run: metrics.jsonl (always), W&B (best effort), a progress bar.

Only process 0 writes. W&B never blocks or crashes training: without an API key it runs
offline; an unreachable server (checked with a 5 s connect) or a failed online start gives
an offline run with one warning saying how to `wandb sync` it later; a failure mid-run or a
finish that does not return within a minute leaves the JSONL file as the record.
"""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import threading
import urllib.parse
import warnings

import jax

from distill import atomic_file


def quiet_libraries():
  """Orbax and friends log every save at INFO; keep the console for the progress bar
  unless --verbosity is given."""
  from absl import flags, logging
  if 'verbosity' in flags.FLAGS and not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


class NonFiniteLossError(FloatingPointError):
  pass


def reduce_metrics(pairs: list[dict]) -> dict[str, float]:
  """Averages (sum, count) metric pairs accumulated over several steps."""
  totals: dict[str, list[float]] = {}
  for metrics in jax.device_get(pairs):
    for name, (value_sum, count) in metrics.items():
      acc = totals.setdefault(name, [0.0, 0.0])
      acc[0] += float(value_sum)
      acc[1] += float(count)
  return {name: s / c if c else float('nan') for name, (s, c) in totals.items()}


class MetricsWriter:

  def __init__(self, workdir: str, config, *, resume_step: int = 0):
    self.is_writer = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._wandb = None
    self._written_step, self._written = None, {}
    if not self.is_writer:
      return
    os.makedirs(workdir, exist_ok=True)
    self._truncate_after(resume_step)
    self._wandb = _start_wandb(workdir, config)

  def _truncate_after(self, step: int):
    """On resume, drops lines logged after the checkpoint (they will be logged again): those
    of later steps and the final evaluation's (logged after the last checkpoint), and a last
    line a killed run left half-written."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [line for line in f if line.strip()]
    records = []
    for i, line in enumerate(lines):
      try:
        records.append(json.loads(line))
      except ValueError as e:
        if i < len(lines) - 1:
          raise ValueError(f'{self.path}: line {i + 1} is not JSON ({e})') from None
        warnings.warn(f'{self.path}: dropped its torn last line {line.strip()[:80]!r}')
    kept = [line for line, r in zip(lines, records)
            if r.get('step', 0) <= step and not any(k.startswith('final/') for k in r)]
    if len(kept) != len(lines):
      atomic_file.write_text(self.path, ''.join(kept))

  def write(self, step: int, metrics: dict, *, check_finite: tuple[str, ...] = ('loss',)):
    for name in check_finite:
      if name in metrics and not math.isfinite(metrics[name]):
        raise NonFiniteLossError(
            f'{name} is {metrics[name]} at step {step}; stopping (last checkpoint kept). '
            'Lower the learning rate or check the data and the teacher.')
    if step != self._written_step:
      self._written_step, self._written = step, {}
    self._written.update(metrics)
    if not self.is_writer:
      return
    record = {'step': int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self._wandb is not None:
      try:
        self._wandb.log({k: v for k, v in record.items() if k != 'step'}, step=int(step))
      except Exception as e:  # noqa: BLE001 - logging must never stop training
        warnings.warn(f'W&B logging failed, continuing with metrics.jsonl only: {e}. '
                      f'What it recorded is in {self._wandb_dir()}: `wandb sync` it later')
        self._wandb = None

  def _wandb_dir(self) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(self.path)), 'wandb')

  def records(self) -> list[dict]:
    """The lines metrics.jsonl holds (after a resume: those up to the resumed step)."""
    if not self.is_writer or not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [json.loads(line) for line in f if line.strip()]

  def written_at(self, step: int) -> dict:
    """Every metric written for `step` so far (train values, eval values)."""
    return dict(self._written) if step == self._written_step else {}

  def close(self, finish_timeout_s: float = 60.0):
    if self._wandb is None:
      return
    # finish() waits for the uploads, which a dead server retries for minutes; the record
    # is on disk either way, so the run does not wait longer than finish_timeout_s.
    finisher = threading.Thread(target=self._finish_quietly, daemon=True)
    finisher.start()
    finisher.join(finish_timeout_s)
    if finisher.is_alive():
      warnings.warn(f'W&B did not finish uploading within {finish_timeout_s:.0f} s; the run is '
                    f'in {self._wandb_dir()}: `wandb sync` it later')

  def _finish_quietly(self):
    try:
      self._wandb.finish()
    except Exception as e:  # noqa: BLE001 - the JSONL file is the record
      warnings.warn(f'W&B finish failed ({e}); the run is in {self._wandb_dir()}: '
                    '`wandb sync` it later')


def _jsonable(value):
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def _start_wandb(workdir: str, config):
  mode = config.wandb.mode
  if mode == 'disabled' or os.environ.get('WANDB_MODE') == 'disabled':
    return None
  if mode == 'auto':
    mode = 'online' if os.environ.get('WANDB_API_KEY') else 'offline'
  try:
    import wandb
  except ImportError as e:
    print(f'W&B unavailable ({e}); metrics go to metrics.jsonl only', file=sys.stderr)
    return None
  server = os.environ.get('WANDB_BASE_URL', 'https://api.wandb.ai')
  if mode == 'online':
    problem = _unreachable(server)
    if problem is None:
      try:
        return _init_wandb(wandb, workdir, config, 'online', init_timeout=30)
      except Exception as e:  # noqa: BLE001 - any failure to go online: record offline
        problem = str(e).splitlines()[0]
    warnings.warn(f'W&B server {server} unreachable ({problem}); training goes on, metrics '
                  'are in metrics.jsonl and in an offline W&B run: upload it later with '
                  f'`wandb sync {os.path.join(os.path.abspath(workdir), "wandb", "offline-run-*")}`')
  try:
    return _init_wandb(wandb, workdir, config, 'offline', init_timeout=30)
  except Exception as e:  # noqa: BLE001 - the JSONL file remains the record
    print(f'W&B unavailable ({e}); metrics go to metrics.jsonl only', file=sys.stderr)
    return None


def _init_wandb(wandb, workdir: str, config, mode: str, *, init_timeout: float):
  return wandb.init(
      project=config.wandb.project, group=config.wandb.group or None,
      name=config.wandb.name or os.path.basename(os.path.abspath(workdir)),
      dir=workdir, mode=mode, config=config.to_dict(), resume='allow',
      settings=wandb.Settings(silent=True, init_timeout=init_timeout))


def _unreachable(url: str, timeout_s: float = 5.0) -> str | None:
  """Why the server at `url` cannot be reached over TCP within timeout_s (None: it can).
  W&B itself retries a dead server for its whole init_timeout before giving up."""
  parsed = urllib.parse.urlparse(url)
  port = parsed.port or (443 if parsed.scheme == 'https' else 80)
  try:
    socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
  except OSError as e:
    return f'{type(e).__name__}: {e}'
  return None
