"""A sweep as a plan: every run's config, directory, state and exact command.

    plan = make_plan(config, invocation, workdir, points)
    for run in plan.runs: run.name, run.config, run.workdir, run.command, run.state()

Each point of the sweep becomes a normal run in WORKDIR/<name>. The plan is what every
launcher executes and what `--list` prints, so a command printed by `--list` and the run the
sweep starts in-process are the same run: its config is the invocation's config file, the
invocation's --config.KEY=VALUE overrides, then the point's values, and W&B settings (one
group per sweep, the run's name, its varied fields as tags).

Teacher caches (algorithms whose kwargs include `cache_dir`: cached_teacher, seqkd) are
shared between the runs they are valid for: runs whose cache-relevant fields (CACHE_DEPENDS_ON)
are equal point at one WORKDIR/<algorithm>_cache[,KEY=VALUE...]; the plan lists, for each,
the run whose config writes it, and launchers write every shared cache before starting the
runs that read it. Only a config that has `algorithm.kwargs.cache_dir` (empty) is pointed at
a shared cache, since the command line can set only fields the config has.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import warnings
from typing import Any

from distill import algorithms
from distill.sweep import axes
from distill.train import config as config_lib
from distill.train import teacher as teacher_lib

# The cache a run writes depends on these fields (prefixes): runs that differ in them get
# their own cache.
CACHE_DEPENDS_ON = ('teacher.', 'task.', 'tokenizer', 'algorithm.', 'seed', 'data.eval_batch_size')
# Fields that do not change a run's results: a finished run is still the same run when only
# these differ (e.g. a sweep relaunched with the progress bar on).
IGNORED_FIELDS = ('progress_bar', 'wandb.', 'keep_checkpoints', 'model.remat_policy')
# Fields derived when building a run (0 in the config: the task's own lengths).
DERIVED_FIELDS = ('task.prompt_len', 'task.completion_len')
W_AND_B_TAG_CHARS = 64


@dataclasses.dataclass(frozen=True)
class Invocation:
  """How the sweep was started: what every run's command repeats."""
  config_file: str             # 'configs/NAME.py[:ARG]' as given to --config
  overrides: dict              # --config.KEY=VALUE given on the command line (typed)
  imports: tuple = ()          # --import modules or files
  cwd: str = '.'               # where the config path and imports resolve
  python: str = sys.executable


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  point: dict                  # {key: value or axes.Labelled}
  config: Any                  # the run's full config
  workdir: str
  command: str                 # a shell line that trains this run, runnable verbatim
  cache: str = ''              # the shared cache it reads ('' if none)
  tags: tuple = ()             # W&B tags: the varied fields

  @property
  def overrides(self) -> dict[str, str]:
    return {k: axes.label_of(v) for k, v in self.point.items()}

  def state(self) -> str:
    """'finished', 'interrupted' (checkpoints or logs, no final metrics) or 'new'.

    A directory holding a run of another config is refused, naming the fields that differ,
    so a changed sweep never overwrites or mixes results. A torn or corrupt record
    (config.json, final_metrics.json) is not finished: it trains again from its checkpoints.
    Finished also needs the exported params, written after final_metrics.json.
    """
    config_path = os.path.join(self.workdir, 'config.json')
    saved = read_record(config_path)
    if saved is not None:
      differences = config_differences(self.config, saved)
      if differences:
        raise ValueError(f'{self.workdir} holds a run with another config ({"; ".join(differences)}'
                         '): use another --workdir, or remove that run to train it anew')
    torn_config = saved is None and os.path.exists(config_path)
    final = read_record(os.path.join(self.workdir, 'final_metrics.json'))
    if final is not None and not torn_config and teacher_lib.has_export(self.workdir):
      return 'finished'
    return 'interrupted' if os.path.exists(config_path) else 'new'


def read_record(path: str) -> dict | None:
  """A run's JSON record; None when it is absent or torn or corrupt (a run killed while
  writing it): a warning names the file, which is left for the resumed run to rewrite."""
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      record = json.load(f)
  except (OSError, ValueError) as e:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
    record = e
  if isinstance(record, dict):
    return record
  warnings.warn(f'{path} is torn or corrupt ({str(record)[:200]}): the run counts as not '
                'finished and resumes from its checkpoints, which rewrites the file')
  return None


@dataclasses.dataclass(frozen=True)
class Plan:
  workdir: str
  runs: list[Run]
  cache_writers: list[Run]     # one run per shared cache: the config that writes it

  def cache_command(self, run: Run) -> str:
    """The shell line that writes `run`'s shared cache and nothing else."""
    return run.command.replace(' -m distill.main ', ' -m distill.sweep.write_cache ', 1)


def flatten(tree: dict, prefix: str = '') -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1} (config.json's nesting as config keys)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def flat_config(config) -> dict:
  return flatten(json.loads(config.to_json_best_effort(sort_keys=True)))


def config_differences(config, saved: dict) -> list[str]:
  """'field: saved → expected' for each field a saved config.json differs in.

  A field the saved config lacks counts only when the run sets it away from the schema's
  default (the run predates the field).
  """
  expected = flat_config(config)
  defaults = flat_config(config_lib.base_config())
  saved = flatten(saved)
  out = []
  for key in sorted(set(expected) | set(saved)):
    if key.startswith(IGNORED_FIELDS):
      continue
    if key in DERIVED_FIELDS and expected.get(key) == 0:
      continue
    if key not in saved and key in defaults and expected.get(key) == defaults[key]:
      continue
    if expected.get(key) != saved.get(key):
      out.append(f'{key}: {saved.get(key, "missing")!r} → {expected.get(key, "missing")!r}')
  return out


def _cache_key(point: dict) -> str:
  parts = [f'{k}={axes.label_of(v)}' for k, v in point.items() if k.startswith(CACHE_DEPENDS_ON)]
  return ','.join(parts)


def _shared_cache(config, point: dict, workdir: str) -> str:
  name = config.algorithm.name
  kwargs = config.algorithm.kwargs
  if 'cache_dir' not in algorithms.get(name).defaults or 'cache_dir' not in kwargs:
    return ''
  if kwargs.cache_dir:
    return ''   # the config names its own cache
  key = _cache_key(point)
  return os.path.join(workdir, f'{name}_cache' + (f',{key}' if key else ''))


def _flag_value(value) -> str:
  return str(axes.value_of(value))


def _command(invocation: Invocation, workdir: str, settings: dict, tags: tuple) -> str:
  args = [invocation.python, '-m', 'distill.main', f'--config={invocation.config_file}',
          f'--workdir={workdir}', *(f'--import={m}' for m in invocation.imports),
          *(f'--config.{k}={_flag_value(v)}' for k, v in settings.items())]
  env = f'WANDB_TAGS={shlex.quote(",".join(tags))} ' if tags else ''
  return f'cd {shlex.quote(invocation.cwd)} && {env}' + ' '.join(shlex.quote(a) for a in args)


def make_plan(config, invocation: Invocation, workdir: str, points: list[dict]) -> Plan:
  """The runs of `points` applied to `config` (already holding the invocation's overrides)."""
  if not points:
    raise ValueError('the sweep has no points')
  workdir = os.path.abspath(workdir)
  clash = sorted(set(invocation.overrides) & set().union(*points))
  if clash:
    raise ValueError(f'--config.{clash[0]} and the sweep both set {clash}: drop one of them')
  group = invocation.overrides.get('wandb.group') or os.path.basename(workdir)
  runs, by_name, cache_writers = [], {}, {}
  for point in points:
    name = axes.run_name(point)
    if name in by_name:
      raise ValueError(f'two points of the sweep map to one run directory {name!r}: '
                       f'{by_name[name]} and {point}')
    by_name[name] = point
    run_config = axes.apply(config, point)
    run_dir = os.path.join(workdir, name)
    cache = _shared_cache(run_config, point, workdir)
    settings = {**invocation.overrides, **point}
    if cache:
      settings['algorithm.kwargs.cache_dir'] = cache
    settings.update({'wandb.group': group, 'wandb.name': name})
    for key in ('algorithm.kwargs.cache_dir', 'wandb.group', 'wandb.name'):
      if key in settings:
        axes.set_value(run_config, key, settings[key])
    tags = tuple(f'{k}={axes.label_of(v)}'[:W_AND_B_TAG_CHARS] for k, v in point.items())
    run = Run(name, point, run_config, run_dir, _command(invocation, run_dir, settings, tags),
              cache, tags)
    runs.append(run)
    if cache:
      cache_writers.setdefault(cache, run)
  return Plan(workdir, runs, list(cache_writers.values()))
