"""Sweep points: axes of config values, their products and zips, applied to a config.

A sweep is a list of points; a point is a dict {config key: value}. Config files declare
theirs next to get_config with the helpers below, and `--sweep=KEY=V1,V2` adds axes:

    from distill import sweep
    def get_sweep(arg=None):
      return sweep.product(
          sweep.axis('model.preset', ['student-100k', 'student-500k']),
          sweep.zip_axes(sweep.axis('loss.divergence', ['forward_kl', 'reverse_kl']),
                         sweep.axis('optimizer.learning_rate', [2e-3, 5e-4])),
          sweep.axis('seed', [0, 1, 2]))

A point's run directory is named KEY=VALUE,KEY=VALUE...; values that are paths (a teacher,
a warm start) take a label for the name: sweep.axis('teacher.checkpoint', paths,
labels=['t1m', 't4m']). Only keys the config already has can be swept, because each run
must also be launchable as `python -m distill.main ... --config.KEY=VALUE`, and the command
line can set only those.
"""
from __future__ import annotations

import difflib
import itertools
from typing import Any, NamedTuple

from distill import algorithms

MAX_NAME_BYTES = 255   # one path component on common file systems


class Labelled(NamedTuple):
  """A value named by `label` in run directories (e.g. a path)."""
  value: Any
  label: str


def axis(key: str, values, labels=None) -> list[dict]:
  """One point per value: [{key: v1}, {key: v2}, ...]."""
  values = list(values)
  if not values:
    raise ValueError(f'sweep axis {key} has no values')
  if labels is not None:
    labels = list(labels)
    if len(labels) != len(values):
      raise ValueError(f'sweep axis {key}: {len(labels)} labels for {len(values)} values')
    values = [Labelled(v, str(label)) for v, label in zip(values, labels)]
  names = [label_of(v) for v in values]
  if len(set(names)) != len(names):
    raise ValueError(f'sweep axis {key} repeats a value: {names}')
  return [{key: v} for v in values]


def product(*sweeps: list[dict]) -> list[dict]:
  """Every combination of the sweeps' points, the first sweep varying slowest."""
  points = [{}]
  for sweep in sweeps:
    if not sweep:
      raise ValueError('a sweep in a product has no points, so the product is empty')
    points = [_merge(a, b) for a, b in itertools.product(points, sweep)]
  return points


def zip_axes(*sweeps: list[dict]) -> list[dict]:
  """Points taken side by side: the i-th of each sweep together (equal lengths)."""
  lengths = [len(s) for s in sweeps]
  if len(set(lengths)) > 1:
    raise ValueError(f'zipped sweeps must have the same number of points, got {lengths}')
  return [_merge_all(points) for points in zip(*sweeps)]


def _merge_all(points) -> dict:
  merged = {}
  for point in points:
    merged = _merge(merged, point)
  return merged


def _merge(a: dict, b: dict) -> dict:
  both = sorted(set(a) & set(b))
  if both:
    raise ValueError(f'sweep key(s) {both} appear in two combined axes')
  return {**a, **b}


def parse_axis(spec: str) -> list[dict]:
  """'a.b=v1,v2,v3' (the --sweep flag) -> axis('a.b', ['v1', 'v2', 'v3'])."""
  key, sep, values = spec.partition('=')
  items = [v.strip() for v in values.split(',')]
  if not sep or not key.strip() or not all(items):
    raise ValueError(f"a sweep axis is 'key=value1,value2,...', got {spec!r}")
  return axis(key.strip(), items)


def label_of(value) -> str:
  """How a value is written in a run's directory name."""
  text = value.label if isinstance(value, Labelled) else str(value)
  for bad in ('/', ',', '='):
    if bad in text:
      raise ValueError(f'sweep value {text!r} contains {bad!r}, which a run directory name '
                       "cannot hold: give the axis labels (sweep.axis(key, values, labels=...))")
  return text


def run_name(point: dict) -> str:
  name = ','.join(f'{k}={label_of(v)}' for k, v in point.items()) or 'base'
  if len(name.encode()) > MAX_NAME_BYTES:
    raise ValueError(f'run name {name[:60]}... is longer than {MAX_NAME_BYTES} bytes: give long '
                     'values shorter labels (sweep.axis(key, values, labels=...))')
  return name


def value_of(value):
  return value.value if isinstance(value, Labelled) else value


def check_point(config, point: dict) -> None:
  """Every key of the point is a field of the config (close matches named otherwise)."""
  for key in point:
    node = config
    parts = key.split('.')
    for depth, part in enumerate(parts):
      if not hasattr(node, 'keys') or part not in node:
        known = list(node.keys()) if hasattr(node, 'keys') else []
        where = '.'.join(parts[:depth]) or 'the config'
        if parts[:depth] == ['algorithm', 'kwargs']:
          known += list(algorithms.get(config.algorithm.name).defaults)
        close = difflib.get_close_matches(part, known, n=3)
        hint = f' (did you mean {", ".join(close)}?)' if close else ''
        raise ValueError(f'sweep key {key!r}: {where} has no field {part!r}{hint}; a sweep can '
                         'set only fields the config has (add it to the config file first)')
      node = node[part]


def typed(text: str, current: Any):
  """A command-line value in the type of the field it replaces (guessed for empty fields)."""
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


def set_value(config, key: str, value) -> None:
  """config[key] = value; a string is converted to the field's type (command-line values)."""
  *path, last = key.split('.')
  node = config
  for part in path:
    node = node[part]
  value = value_of(value)
  try:
    if isinstance(value, str):
      value = typed(value, node.get(last))
    node[last] = value
  except (TypeError, ValueError) as e:
    raise ValueError(f'sweep value for {key}: {e}') from None


def apply(config, point: dict):
  """A copy of the config with the point's values set."""
  check_point(config, point)
  run_config = config.copy_and_resolve_references()
  for key, value in point.items():
    set_value(run_config, key, value)
  return run_config
