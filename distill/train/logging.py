"""Metrics out of the run: metrics.jsonl (always), W&B (best effort), a progress bar.

Only process 0 writes. W&B never blocks or crashes training: without an API key it runs
offline, and any failure to start it leaves the JSONL file as the record.
"""
from __future__ import annotations

import json
import math
import os
import sys
import warnings

import jax


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
    if not self.is_writer:
      return
    os.makedirs(workdir, exist_ok=True)
    self._truncate_after(resume_step)
    self._wandb = _start_wandb(workdir, config)

  def _truncate_after(self, step: int):
    """On resume, drops lines logged after the checkpoint (they will be logged again)."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get('step', 0) <= step]
    if len(kept) != len(lines):
      tmp = self.path + '.tmp'
      with open(tmp, 'w') as f:
        f.writelines(kept)
      os.replace(tmp, self.path)

  def write(self, step: int, metrics: dict, *, check_finite: tuple[str, ...] = ('loss',)):
    for name in check_finite:
      if name in metrics and not math.isfinite(metrics[name]):
        raise NonFiniteLossError(
            f'{name} is {metrics[name]} at step {step}; stopping (last checkpoint kept). '
            'Lower the learning rate or check the data and the teacher.')
    if not self.is_writer:
      return
    record = {'step': int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self._wandb is not None:
      try:
        self._wandb.log({k: v for k, v in record.items() if k != 'step'}, step=int(step))
      except Exception as e:  # noqa: BLE001 - logging must never stop training
        warnings.warn(f'W&B logging failed, continuing with metrics.jsonl only: {e}')
        self._wandb = None

  def close(self):
    if self._wandb is not None:
      try:
        self._wandb.finish()
      except Exception:  # noqa: BLE001
        pass


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
    return wandb.init(
        project=config.wandb.project, group=config.wandb.group or None,
        name=config.wandb.name or os.path.basename(os.path.abspath(workdir)),
        dir=workdir, mode=mode, config=config.to_dict(), resume='allow',
        settings=wandb.Settings(silent=True, init_timeout=60))
  except Exception as e:  # noqa: BLE001 - no network or no wandb: the JSONL file remains
    print(f'W&B unavailable ({e}); metrics go to metrics.jsonl only', file=sys.stderr)
    return None
