"""Mean and 95% confidence interval over seeds (Student's t).

The t quantiles are a table (df ≤ 30) and the Cornish–Fisher expansion beyond, so the report
needs no SciPy at run time (SciPy is a test dependency only; tests/test_report.py checks
these values against scipy.stats.t).
"""
from __future__ import annotations

import math
import statistics

# t_{0.975, df} for df = 1..30.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_Z975 = 1.959964


def t975(df: int) -> float:
  """The two-sided 95% quantile of Student's t with df degrees of freedom."""
  if df < 1:
    raise ValueError(f'degrees of freedom must be >= 1, got {df}')
  if df <= len(_T975):
    return _T975[df - 1]
  z = _Z975
  return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_ci95(values: list[float]) -> tuple[float, float]:
  """(mean, half-width of the 95% interval); the half-width is nan for a single value."""
  if not values:
    raise ValueError('no values')
  mean = statistics.fmean(values)
  if len(values) < 2:
    return mean, math.nan
  return mean, t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
