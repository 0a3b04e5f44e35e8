"""Expand a config over sweep axes, train every combination, aggregate the final metrics.

    axes = [parse_axis('model.preset=student-100k,student-500k,student-2m')]
    results = run_sweep(config, '/tmp/sweep', axes)

Each combination is a normal run (`trainer.train`) in WORKDIR/KEY=VALUE[,KEY=VALUE...]/,
run one after another; starting the sweep again resumes each where it stopped (a finished
run is only re-evaluated). After every run WORKDIR/results.json and WORKDIR/results.md hold
the table so far: one row per run, its axis values and its final metrics.

Teacher work done once per sweep: algorithms that write a teacher cache (those whose kwargs
include `cache_dir`: cached_teacher, seqkd) share WORKDIR/<algorithm>_cache across the runs
when the config leaves cache_dir empty and no axis changes what the cache depends on
(teacher, task, tokenizer, algorithm, seed); the first run writes it, the others reuse it.
"""
from __future__ import annotations

import itertools
import json
import os
from typing import Any, Callable

import jax

from distill import algorithms
from distill.train import trainer

# A sweep over keys starting with these gives each run its own cache.
CACHE_DEPENDS_ON = ('teacher.', 'task.', 'tokenizer', 'algorithm.', 'seed', 'data.eval_batch_size')
# Metrics shown first in the table, when present (the rest follow alphabetically).
LEADING_METRICS = ('params', 'accuracy', 'ce', 'perplexity', 'kl_forward', 'kl_reverse',
                   'teacher_ce')


def parse_axis(spec: str) -> tuple[str, list[str]]:
  """'a.b=v1,v2,v3' -> ('a.b', ['v1', 'v2', 'v3'])."""
  key, sep, values = spec.partition('=')
  items = [v.strip() for v in values.split(',')]
  if not sep or not key.strip() or not all(items):
    raise ValueError(f"a sweep axis is 'key=value1,value2,...', got {spec!r}")
  for v in items:
    if '/' in v:
      raise ValueError(f'sweep value {v!r} of {key} contains "/": it names a directory')
  if len(set(items)) != len(items):
    raise ValueError(f'sweep axis {key} repeats a value: {items}')
  return key.strip(), items


def _parent(config, key: str):
  *path, last = key.split('.')
  node = config
  for part in path:
    node = node[part]   # a misspelled key fails here with the close matches named
  return node, last


def _typed(text: str, current: Any):
  """The override's value in the type of the field it replaces (guessed for empty fields)."""
  lowered = text.lower()
  if isinstance(current, bool) or (current is None and lowered in ('true', 'false')):
    if lowered not in ('true', 'false'):
      raise ValueError(f'expected true or false, got {text!r}')
    return lowered == 'true'
  if current is not None:
    return type(current)(text)
  for convert in (int, float):
    try:
      return convert(text)
    except ValueError:
      pass
  return text


def set_value(config, key: str, text: str) -> None:
  node, last = _parent(config, key)
  current = node.get(last) if last in node else None
  try:
    value = _typed(text, current)
  except ValueError as e:
    raise ValueError(f'sweep value for {key}: {e}') from None
  node[last] = value


def expand(config, axes: list[tuple[str, list[str]]]) -> list[tuple[str, dict, Any]]:
  """Every combination of the axes' values: [(run name, {key: text}, config)], in order."""
  keys = [k for k, _ in axes]
  if len(set(keys)) != len(keys):
    raise ValueError(f'a key appears in two sweep axes: {keys}')
  runs = []
  for values in itertools.product(*(v for _, v in axes)):
    overrides = dict(zip(keys, values))
    run_config = config.copy_and_resolve_references()
    for key, text in overrides.items():
      set_value(run_config, key, text)
    name = ','.join(f'{k}={v}' for k, v in overrides.items()) or 'base'
    runs.append((name, overrides, run_config))
  return runs


def share_caches(runs, workdir: str, keys: list[str]) -> None:
  """Points cache-writing algorithms of all runs at one cache per algorithm (see above)."""
  if any(k.startswith(CACHE_DEPENDS_ON) for k in keys):
    return
  for _, _, config in runs:
    name = config.algorithm.name
    defaults = algorithms.get(name).defaults
    if 'cache_dir' in defaults and not config.algorithm.kwargs.get('cache_dir'):
      config.algorithm.kwargs.cache_dir = os.path.join(os.path.abspath(workdir),
                                                       f'{name}_cache')


def run_sweep(config, workdir: str, axes: list[tuple[str, list[str]]],
              train: Callable[[Any, str], dict] | None = None) -> list[dict]:
  """Trains every combination in turn; returns the rows of results.json."""
  train = train or trainer.train
  runs = expand(config, axes)
  share_caches(runs, workdir, [k for k, _ in axes])
  os.makedirs(workdir, exist_ok=True)
  results = []
  for i, (name, overrides, run_config) in enumerate(runs):
    print(f'sweep: run {i + 1}/{len(runs)}: {name}', flush=True)
    final = train(run_config, os.path.join(workdir, name))
    results.append({'name': name, 'overrides': overrides, 'final': final})
    if jax.process_index() == 0:
      write_tables(workdir, results)
  return results


def _format(value) -> str:
  if isinstance(value, float):
    return f'{value:.4g}'
  return str(value)


def markdown_table(results: list[dict]) -> str:
  keys = list(dict.fromkeys(k for r in results for k in r['overrides']))
  present = set().union(*(r['final'] for r in results)) if results else set()
  metrics = [m for m in LEADING_METRICS if m in present]
  metrics += sorted(present - set(metrics))
  header = ['run', *keys, *metrics]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for r in results:
    cells = [r['name'], *(r['overrides'].get(k, '') for k in keys),
             *(_format(r['final'].get(m, '')) for m in metrics)]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def write_tables(workdir: str, results: list[dict]) -> None:
  for name, text in (('results.json', json.dumps(results, indent=1, default=float)),
                     ('results.md', markdown_table(results))):
    path = os.path.join(workdir, name)
    with open(path + '.tmp', 'w') as f:
      f.write(text)
    os.replace(path + '.tmp', path)
