"""MiniLLM (Gu et al., ICLR 2024) at CPU scale: its two ablated ingredients, teacher-mixed
sampling (α = 0.2 vs none) and length normalisation of the long-term term, on warm-started
students.

    python -m distill.sweep --config=experiments/minillm/config.py:arithmetic \
        --workdir=workdirs/minillm

ARG: the task (arithmetic, arithmetic4 or hmm). Needs the size study's teacher and warm
starts (experiments/size_study/README.md); see README.md here.
"""
from distill import sweep
from experiments.size_study import config as study


def get_config(arg=None):
  return study.get_config(f'minillm,{arg or "arithmetic"}')


def get_sweep(arg=None):
  return sweep.product(sweep.axis('algorithm.kwargs.teacher_mix', [0.0, 0.2]),
                       sweep.axis('algorithm.kwargs.length_norm', [False, True]),
                       study.continuation_points(arg or 'arithmetic'))
