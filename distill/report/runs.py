"""Finished runs read from their directories, checked comparable, grouped by method and size.

A run is a directory with config.json and final_metrics.json (what distill.main leaves); a
directory given to the report may be a run or hold runs at any depth (a sweep). Grouping:
  seed    config.seed: the replicates a group's interval is over
  size    the student's parameter count (final 'params'), labelled by model.preset
  method  every other field that differs between the runs (algorithm, divergence, λ, learning
          rate, teacher, warm start, ...), written 'algorithm=gkd, lmbda=0.5'
Runs measured differently (another task, tokenizer or evaluation set) are refused.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings

from distill.sweep import plan as plan_lib
from distill.train import config as config_lib

# Metrics of the report, in order, when any run has them; 'tokens' and 'train_seconds' are
# derived from config.json and metrics.jsonl.
METRICS = ('accuracy', 'kl_forward', 'kl_reverse', 'truth_kl_forward', 'truth_kl_reverse', 'ce',
           'perplexity', 'tokens', 'train_seconds')
HIGHER_IS_BETTER = ('accuracy',)
# Runs whose values differ in these are not measured on the same thing.
MUST_MATCH = ('task.', 'tokenizer', 'data.eval_batch_size', 'eval.')
# Fields that never tell methods apart (bookkeeping, or the size and seed axes).
NOT_METHOD = ('seed', 'model.', 'wandb.', 'progress_bar', 'keep_checkpoints', 'checkpoint_steps',
              'log_steps', 'algorithm.kwargs.cache_dir')


@dataclasses.dataclass
class RunRecord:
  path: str
  config: dict                 # config.json flattened: {'a.b': value}
  final: dict                  # final_metrics.json plus 'tokens' and 'train_seconds'
  curve: list[dict]            # metrics.jsonl records
  method: str = ''

  @property
  def seed(self):
    return self.config.get('seed')

  @property
  def params(self) -> int:
    return int(self.final['params'])

  @property
  def size_label(self) -> str:
    return str(self.config.get('model.preset', ''))


def find_run_dirs(directory: str) -> list[str]:
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{directory} is not a directory')
  found = []
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    if 'final_metrics.json' in files and 'config.json' in files:
      found.append(root)
      dirs.clear()   # a run's subdirectories (checkpoints, caches) hold no runs
  return found


def _train_seconds(curve: list[dict], tokens_per_step: int) -> float:
  """Training time summed over the logged intervals (tokens / throughput); a resumed run
  counts each step once."""
  seconds, last_step = 0.0, 0
  for record in curve:
    if 'tokens_per_s' in record:
      seconds += (record['step'] - last_step) * tokens_per_step / record['tokens_per_s']
      last_step = record['step']
  return seconds


def _curve(path: str) -> list[dict]:
  """metrics.jsonl's records; a torn last line (a run killed while logging) is left out."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  curve = []
  for i, line in enumerate(lines):
    try:
      curve.append(json.loads(line))
    except ValueError:
      if i < len(lines) - 1:
        raise ValueError(f'{path} line {i + 1} is not JSON: {line[:80]!r}') from None
      warnings.warn(f'{path}: its torn last line is left out of the learning curve')
  return curve


def load_run(path: str, defaults: dict | None = None) -> RunRecord | None:
  """The run in `path`; fields its config.json predates take the schema's defaults. None (with
  a warning naming the file) when its config.json or final_metrics.json is torn or corrupt."""
  if defaults is None:
    defaults = plan_lib.flat_config(config_lib.base_config())
  saved = plan_lib.read_record(os.path.join(path, 'config.json'))
  final = plan_lib.read_record(os.path.join(path, 'final_metrics.json'))
  if saved is None or final is None:
    return None
  config = {**defaults, **plan_lib.flatten(saved)}
  curve = _curve(os.path.join(path, 'metrics.jsonl'))
  tokens_per_step = config['data.batch_size'] * (config['task.prompt_len'] +
                                                 config['task.completion_len'])
  final = {**final, 'tokens': config['total_steps'] * tokens_per_step,
           'train_seconds': _train_seconds(curve, tokens_per_step)}
  return RunRecord(path, config, final, curve)


def load_runs(directories: list[str]) -> list[RunRecord]:
  """Every finished run under the directories, checked comparable, with its method label."""
  paths = []
  for directory in directories:
    found = find_run_dirs(directory)
    if not found:
      raise ValueError(f'no finished runs under {directory} (a finished run is a directory '
                       'with config.json and final_metrics.json)')
    paths += found
  defaults = plan_lib.flat_config(config_lib.base_config())
  runs = [run for run in (load_run(p, defaults) for p in dict.fromkeys(paths)) if run]
  if not runs:
    raise ValueError(f'no readable finished runs under {", ".join(directories)} (their '
                     'records are torn or corrupt; see the warnings)')
  check_comparable(runs)
  label_methods(runs)
  return runs


def _varied(runs: list[RunRecord]) -> list[str]:
  keys = sorted(set().union(*(r.config for r in runs)))
  return [k for k in keys if len({json.dumps(r.config.get(k)) for r in runs}) > 1]


def check_comparable(runs: list[RunRecord]) -> None:
  for key in _varied(runs):
    if key.startswith(MUST_MATCH):
      by_value: dict[str, list[str]] = {}
      for r in runs:
        by_value.setdefault(json.dumps(r.config.get(key)), []).append(r.path)
      described = '; '.join(f'{value} in {len(paths)} run(s), e.g. {paths[0]}'
                            for value, paths in by_value.items())
      raise ValueError(f'the runs are not comparable: {key} differs ({described}); report '
                       'them separately')


def _short(key: str, keys: list[str]) -> str:
  parts = key.split('.')
  short = parts[-2] if parts[-1] == 'name' and len(parts) > 1 else parts[-1]
  clashes = [k for k in keys if k != key and k.split('.')[-1] == parts[-1]]
  return key if clashes else short


def _shown(value) -> str:
  """A value as a label shows it: paths (a teacher's directory) by their last component."""
  if isinstance(value, str) and '/' in value:
    return os.path.basename(value.rstrip('/'))
  return str(value)


def label_methods(runs: list[RunRecord]) -> None:
  """Sets each run's method: its values of the fields that vary, except size and seed.

  A field only some runs have (a method's own kwargs) is named only where it varies among
  those runs, so 'algorithm=gkd, lmbda=0.5' rather than every GKD option.
  """
  keys = []
  for key in _varied(runs):
    having = [r for r in runs if key in r.config]
    if key.startswith(NOT_METHOD):
      continue
    if len(having) == len(runs) or len({json.dumps(r.config[key]) for r in having}) > 1:
      keys.append(key)
  keys.sort(key=lambda k: k != 'algorithm.name')
  warm = len({bool(r.config.get('model.init_from')) for r in runs}) > 1
  for r in runs:
    parts = [f'{_short(k, keys)}={_shown(r.config[k])}' for k in keys if k in r.config]
    if warm and r.config.get('model.init_from'):
      parts.append('warm start')
    r.method = ', '.join(parts) or 'all runs'
