"""A sweep's table: one row per run, its varied fields and its final metrics.

WORKDIR/results.json holds [{'name', 'overrides', 'final'}] and WORKDIR/results.md the same
as Markdown; `python -m distill.report` aggregates over seeds and plots.
"""
from __future__ import annotations

import json
import os

from distill import atomic_file
from distill.sweep import plan as plan_lib

# Metrics shown first in the table, when present (the rest follow alphabetically).
LEADING_METRICS = ('params', 'accuracy', 'ce', 'perplexity', 'kl_forward', 'kl_reverse',
                   'teacher_ce')


def collect(runs) -> list[dict]:
  """The rows of the finished runs among `runs` (distill.sweep.plan.Run), in order (a torn
  final_metrics.json is skipped with a warning naming it)."""
  results = []
  for run in runs:
    final = plan_lib.read_record(os.path.join(run.workdir, 'final_metrics.json'))
    if final is not None:
      results.append({'name': run.name, 'overrides': run.overrides, 'final': final})
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
    atomic_file.write_text(os.path.join(workdir, name), text)
