"""Runs aggregated over seeds per (method, size): Markdown and CSV.

Each group's metric is 'mean ± half-width of the 95% interval' over its seeds (a single seed:
the value alone).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math

from distill.report import stats
from distill.report.runs import METRICS, RunRecord


@dataclasses.dataclass
class Group:
  method: str
  size_label: str
  params: int
  runs: list[RunRecord]
  metrics: dict                # name -> (mean, ci95 half-width)

  @property
  def seeds(self) -> list:
    return [r.seed for r in self.runs]


def aggregate(runs: list[RunRecord]) -> list[Group]:
  """Groups by method, then size (ascending), in the order methods first appear."""
  keyed: dict[tuple, list[RunRecord]] = {}
  for r in runs:
    keyed.setdefault((r.method, r.params), []).append(r)
  methods = list(dict.fromkeys(r.method for r in runs))
  groups = []
  for (method, params), members in sorted(keyed.items(),
                                          key=lambda kv: (methods.index(kv[0][0]), kv[0][1])):
    metrics = {m: stats.mean_ci95([float(r.final[m]) for r in members])
               for m in METRICS if all(m in r.final for r in members)}
    groups.append(Group(method, members[0].size_label, params, members, metrics))
  return groups


def present_metrics(groups: list[Group]) -> list[str]:
  return [m for m in METRICS if any(m in g.metrics for g in groups)]


def _cell(metric: str, value: tuple[float, float] | None) -> str:
  if value is None:
    return '—'
  mean, half = value
  scale, unit, digits = (100.0, '%', 1) if metric == 'accuracy' else (1.0, '', 4)
  if metric in ('tokens', 'train_seconds'):
    digits = 0
  text = f'{scale * mean:,.{digits}f}'
  if not math.isnan(half):
    text += f' ± {scale * half:,.{digits}f}'
  return text + unit


def markdown(groups: list[Group]) -> str:
  metrics = present_metrics(groups)
  header = ['method', 'size', 'params', 'seeds', *metrics]
  lines = ['| ' + ' | '.join(header) + ' |', '|---|---|' + '---:|' * (len(header) - 2)]
  for g in groups:
    cells = [g.method, g.size_label, f'{g.params:,}', str(len(g.runs)),
             *(_cell(m, g.metrics.get(m)) for m in metrics)]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def csv_text(groups: list[Group]) -> str:
  metrics = present_metrics(groups)
  out = io.StringIO()
  writer = csv.writer(out, lineterminator='\n')
  writer.writerow(['method', 'size', 'params', 'n', 'seeds',
                   *(f'{m}_{part}' for m in metrics for part in ('mean', 'ci95'))])
  for g in groups:
    values = []
    for m in metrics:
      values += list(g.metrics.get(m, ('', '')))
    writer.writerow([g.method, g.size_label, g.params, len(g.runs), ' '.join(map(str, g.seeds)),
                     *values])
  return out.getvalue()
