"""TAID (Shing et al., ICLR 2025) at CPU scale: the interpolation's start t_start and its
adaptive step α, on warm-started students; the capacity-gap claim is tested by the size
study's teacher-size axis (experiments/size_study).

    python -m distill.sweep --config=experiments/taid/config.py:arithmetic --workdir=workdirs/taid

ARG: the task (arithmetic, arithmetic4 or hmm). Needs the size study's teacher and warm
starts (experiments/size_study/README.md); see README.md here.
"""
from distill import sweep
from experiments.size_study import config as study


def get_config(arg=None):
  return study.get_config(f'taid,{arg or "arithmetic"}')


def get_sweep(arg=None):
  return sweep.product(sweep.axis('algorithm.kwargs.t_start', [0.2, 0.4, 0.7]),
                       sweep.axis('algorithm.kwargs.alpha', [5e-4, 3e-2]),
                       study.continuation_points(arg or 'arithmetic'))
