"""On-policy distillation (per-token reverse KL on the student's samples, as in the Qwen3
report and GKD with λ = 1 and reverse KL) at CPU scale: the learning rate and the reward
(per token vs reward-to-go), on warm-started students.

    python -m distill.sweep --config=experiments/onpolicy_distillation/config.py:arithmetic \
        --workdir=workdirs/onpolicy_distillation

ARG: the task (arithmetic, arithmetic4 or hmm). Needs the size study's teacher and warm
starts (experiments/size_study/README.md); see README.md here.
"""
from distill import sweep
from experiments.size_study import config as study


def get_config(arg=None):
  c = study.get_config(f'onpolicy,{arg or "arithmetic"}')
  with c.unlocked():
    c.algorithm.kwargs.reward_to_go = False
  return c


def get_sweep(arg=None):
  return sweep.product(sweep.axis('optimizer.learning_rate', [1e-3, 3e-4, 1e-4]),
                       sweep.axis('algorithm.kwargs.reward_to_go', [False, True]),
                       study.continuation_points(arg or 'arithmetic'))
