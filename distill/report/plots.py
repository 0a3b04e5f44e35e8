"""The report's figures (matplotlib), each returned as a Figure for a file or a notebook.

  metric_vs_params  one panel per metric: mean and 95% interval against student parameters
                    (log x), a line per method
  learning_curves   one panel per student size: the curve metric against the step, mean over
                    seeds, a line per method
  pareto            quality against training wall time (log x), a point per (method, size),
                    the non-dominated points joined
"""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
from matplotlib import ticker
import numpy as np

from distill.report.runs import HIGHER_IS_BETTER
from distill.report.tables import Group

# In order of preference: the quality a Pareto plot uses, and the curve learning curves show.
QUALITY = ('accuracy', 'truth_kl_forward', 'kl_forward', 'ce')
CURVES = ('eval/accuracy', 'eval/truth_kl_forward', 'eval/kl_forward', 'eval/ce', 'loss')
PANEL_METRICS = ('accuracy', 'truth_kl_forward', 'truth_kl_reverse', 'kl_forward', 'kl_reverse',
                 'ce')


def _methods(groups: list[Group]) -> list[str]:
  return list(dict.fromkeys(g.method for g in groups))


def _colours(methods: list[str]) -> dict:
  cmap = plt.get_cmap('tab10' if len(methods) <= 10 else 'tab20')
  return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def _legend_columns(labels: list[str]) -> int:
  return 1 if max(map(len, labels)) > 40 else min(len(labels), 3)


def _legend_and_layout(fig, ax):
  """The legend under the panels, in as many rows as the labels' lengths need."""
  handles, labels = ax.get_legend_handles_labels()
  columns = _legend_columns(labels)
  rows = math.ceil(len(labels) / columns)
  legend_inches = 0.25 * rows + 0.2
  fig.set_figheight(fig.get_figheight() + legend_inches)
  fig.legend(handles, labels, loc='lower center', ncol=columns, fontsize='small', frameon=False)
  fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 1))


def _size_ticks(ax, params: list[int]) -> None:
  """The students' sizes as the x ticks: a log axis's own minor labels overlap at the spans
  a size sweep covers."""
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  ax.set_xticks(params, [compact(p) for p in params])


def compact(params: int) -> str:
  """9232 -> '9.2k', 1_200_000 -> '1.2M'."""
  for scale, unit in ((1e9, 'B'), (1e6, 'M'), (1e3, 'k')):
    if params >= scale:
      return f'{params / scale:.3g}{unit}'
  return str(params)


def quality_metric(groups: list[Group]) -> str:
  for metric in QUALITY:
    if all(metric in g.metrics for g in groups):
      return metric
  raise ValueError(f'no quality metric ({", ".join(QUALITY)}) is present in every group')


def metric_vs_params(groups: list[Group]):
  metrics = [m for m in PANEL_METRICS if any(m in g.metrics for g in groups)]
  methods = _methods(groups)
  colours = _colours(methods)
  cols = min(3, len(metrics))
  rows = math.ceil(len(metrics) / cols)
  fig, axs = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
  for ax, metric in zip(axs.flat, metrics):
    for method in methods:
      mine = sorted((g for g in groups if g.method == method and metric in g.metrics),
                    key=lambda g: g.params)
      if not mine:
        continue
      x = [g.params for g in mine]
      mean = np.array([g.metrics[metric][0] for g in mine])
      half = np.nan_to_num(np.array([g.metrics[metric][1] for g in mine]))
      ax.errorbar(x, mean, yerr=half, marker='o', capsize=3, color=colours[method], label=method)
    ax.set_xscale('log')
    _size_ticks(ax, sorted({g.params for g in groups}))
    ax.set_xlabel('student parameters')
    ax.set_title(metric + (' (higher is better)' if metric in HIGHER_IS_BETTER else
                           ' (lower is better)'), fontsize='medium')
    ax.grid(alpha=0.3)
  for ax in list(axs.flat)[len(metrics):]:
    ax.set_visible(False)
  _legend_and_layout(fig, axs.flat[0])
  return fig


def curve_metric(groups: list[Group]) -> str:
  for name in CURVES:
    if any(name in record for g in groups for r in g.runs for record in r.curve):
      return name
  raise ValueError(f'no run logged any of {", ".join(CURVES)}')


def learning_curves(groups: list[Group]):
  name = curve_metric(groups)
  sizes = sorted({(g.params, g.size_label) for g in groups})
  methods = _methods(groups)
  colours = _colours(methods)
  fig, axs = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.6), squeeze=False)
  for ax, (params, label) in zip(axs.flat, sizes):
    for g in (g for g in groups if g.params == params):
      by_step: dict[int, list[float]] = {}
      for r in g.runs:
        for record in r.curve:
          if isinstance(record.get(name), (int, float)):
            by_step.setdefault(record['step'], []).append(record[name])
      steps = sorted(by_step)
      ax.plot(steps, [np.mean(by_step[s]) for s in steps], color=colours[g.method],
              label=g.method)
    ax.set_title(f'{label} ({compact(params)} params)', fontsize='medium')
    ax.set_xlabel('step')
    ax.set_ylabel(name + (' (objectives differ by method)' if name == 'loss' else ''))
    ax.grid(alpha=0.3)
  _legend_and_layout(fig, axs.flat[0])
  return fig


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
  """Indices of the points no other point beats on both cost (lower) and quality."""
  sign = -1.0 if higher_is_better else 1.0
  front = []
  for i, (cost, quality) in enumerate(points):
    dominated = any(c <= cost and sign * q <= sign * quality and (c, q) != (cost, quality)
                    for c, q in points)
    if not dominated:
      front.append(i)
  return sorted(front, key=lambda i: points[i][0])


def pareto(groups: list[Group]):
  metric = quality_metric(groups)
  methods = _methods(groups)
  colours = _colours(methods)
  fig, ax = plt.subplots(figsize=(6.4, 4.6))
  points = [(g.metrics['train_seconds'][0], g.metrics[metric][0]) for g in groups]
  for method in methods:
    mine = [(p, g) for p, g in zip(points, groups) if g.method == method]
    ax.scatter([p[0] for p, _ in mine], [p[1] for p, _ in mine], color=colours[method],
               label=method, s=36)
    for (x, y), g in mine:
      ax.annotate(compact(g.params), (x, y), fontsize='x-small', xytext=(3, 3),
                  textcoords='offset points')
  front = pareto_front(points, metric in HIGHER_IS_BETTER)
  ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color='grey',
          linestyle='--', linewidth=1, label='Pareto front')
  ax.set_xscale('log')
  ax.set_xlabel('training wall time per run (s); labels: student parameters')
  ax.set_ylabel(metric + (' (higher is better)' if metric in HIGHER_IS_BETTER else
                          ' (lower is better)'))
  ax.grid(alpha=0.3)
  _legend_and_layout(fig, ax)
  return fig
