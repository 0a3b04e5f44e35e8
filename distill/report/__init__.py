"""Reports over finished runs: Markdown + CSV (mean ± 95% interval over seeds per method and
student size) and PNG plots (metric vs parameters, learning curves, Pareto of quality vs
training time).

    python -m distill.report runs/sweep [runs/other_sweep ...] [--out=DIR]

From Python (or a notebook): runs = load_runs([...]); groups = aggregate(runs);
plots.metric_vs_params(groups) returns a matplotlib Figure.
"""
import os
from typing import Callable

import matplotlib.pyplot as plt

from distill.report import plots
from distill.report.runs import RunRecord, load_runs
from distill.report.tables import Group, aggregate, csv_text, markdown

__all__ = ['Group', 'RunRecord', 'aggregate', 'csv_text', 'load_runs', 'markdown', 'plots',
           'write_report']


def _sources(directories: list[str]) -> str:
  """The directories a report read, named in full when few, else by count and common parent
  (a study passes every run's directory)."""
  if len(directories) <= 3:
    return ', '.join(directories)
  return f'{len(directories)} directories under {os.path.commonpath(directories)}'


def write_report(directories: list[str], out: str,
                 method_label: Callable[[RunRecord], str] | None = None) -> list[str]:
  """Reads, checks and aggregates every run first, then writes; returns the files written.

  method_label(run) names each run's method in place of the label made from the fields that
  differ between the runs (a study that knows its methods by name passes one).
  """
  runs = load_runs(directories)
  if method_label is not None:
    for run in runs:
      run.method = method_label(run)
  groups = aggregate(runs)
  figures = {'metric_vs_params.png': plots.metric_vs_params(groups),
             'learning_curves.png': plots.learning_curves(groups),
             'pareto.png': plots.pareto(groups)}
  os.makedirs(out, exist_ok=True)
  written = []
  sources = _sources(directories)
  for name, text in (('report.md', f'Runs: {sources}\n\n{markdown(groups)}'),
                     ('report.csv', csv_text(groups))):
    with open(os.path.join(out, name), 'w') as f:
      f.write(text)
    written.append(os.path.join(out, name))
  for name, fig in figures.items():
    fig.savefig(os.path.join(out, name), dpi=120)
    plt.close(fig)
    written.append(os.path.join(out, name))
  return written
