"""DistiLLM (Ko et al., ICML 2024) at CPU scale: skew forward vs skew reverse KL and the skew α,
with the adaptive off-/on-policy schedule and replay buffer, on warm-started students.

    python -m distill.sweep --config=experiments/distillm/config.py:arithmetic \
        --workdir=workdirs/distillm

ARG: the task (arithmetic, arithmetic4 or hmm). Needs the size study's teacher and warm
starts (experiments/size_study/README.md); see README.md here.
"""
from distill import sweep
from experiments.size_study import config as study


def get_config(arg=None):
  return study.get_config(f'distillm,{arg or "arithmetic"}')


def get_sweep(arg=None):
  return sweep.product(sweep.axis('loss.divergence', ['skew_forward_kl', 'skew_reverse_kl']),
                       sweep.axis('loss.hparams.alpha', [0.1, 0.5]),
                       study.continuation_points(arg or 'arithmetic'))
