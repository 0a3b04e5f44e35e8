"""Sequence-level KD (Kim & Rush, EMNLP 2016) at CPU scale: Seq-KD (cross-entropy on the
teacher's greedy completions) vs Seq-KD + Word-KD (half forward KL to the teacher on them),
on warm-started students.

    python -m distill.sweep --config=experiments/seqkd/config.py:arithmetic \
        --workdir=workdirs/seqkd

ARG: the task (arithmetic, arithmetic4 or hmm). Needs the size study's teacher and warm
starts (experiments/size_study/README.md); see README.md here.
"""
from distill import sweep
from experiments.size_study import config as study


def get_config(arg=None):
  return study.get_config(f'seqkd,{arg or "arithmetic"}')


def get_sweep(arg=None):
  return sweep.product(sweep.zip_axes(sweep.axis('loss.kd_weight', [0.0, 0.5]),
                                      sweep.axis('loss.ce_weight', [1.0, 0.5])),
                       study.continuation_points(arg or 'arithmetic'))
