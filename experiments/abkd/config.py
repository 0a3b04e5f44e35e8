"""ABKD (Wang et al., ICML 2025) at CPU scale: the α-β divergence on the dataset (supervised
KD), from its forward-KL corner (α, β) = (1, 0) through interior points to its reverse-KL
corner (0, 1), on warm-started students.

    python -m distill.sweep --config=experiments/abkd/config.py:arithmetic --workdir=workdirs/abkd

ARG: the task (arithmetic, arithmetic4 or hmm). Needs the size study's teacher and warm
starts (experiments/size_study/README.md); see README.md here.
"""
from distill import sweep
from experiments.size_study import config as study

ALPHA_BETA = [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (0.8, 0.2), (0.2, 0.7), (1.0, 0.5)]


def get_config(arg=None):
  c = study.get_config(f'kd,{arg or "arithmetic"}')
  c.loss.divergence = 'ab'
  with c.unlocked():
    c.loss.hparams.alpha, c.loss.hparams.beta = 0.5, 0.5
  return c


def get_sweep(arg=None):
  pairs = [{'loss.hparams.alpha': alpha, 'loss.hparams.beta': beta} for alpha, beta in ALPHA_BETA]
  return sweep.product(pairs, study.continuation_points(arg or 'arithmetic'))
