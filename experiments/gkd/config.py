"""GKD (Agarwal et al., ICLR 2024) at CPU scale: the λ × β grid on warm-started students.

    python -m distill.sweep --config=experiments/gkd/config.py:arithmetic --workdir=workdirs/gkd

ARG: the task (arithmetic, arithmetic4 or hmm). Needs the size study's teacher and warm
starts (experiments/size_study/README.md); see README.md here.
"""
from distill import sweep
from experiments.size_study import config as study


def get_config(arg=None):
  return study.get_config(f'gkd,{arg or "arithmetic"}')


def get_sweep(arg=None):
  return sweep.product(sweep.axis('algorithm.kwargs.lmbda', [0.0, 0.5, 1.0]),
                       sweep.axis('loss.hparams.beta', [0.1, 0.5, 0.9]),
                       study.continuation_points(arg or 'arithmetic'))
