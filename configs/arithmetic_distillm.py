"""DistiLLM (Ko et al., ICML 2024) on the arithmetic student: skew KL (α = 0.1) with the
adaptive off-policy schedule and a replay buffer of student outputs.

The probability of student outputs starts at 0 and grows by 0.1 at each evaluation whose
validation cross-entropy rose by ≥ 0.1 (the released code's defaults); it therefore needs
evaluations during training (eval_steps). Needs --config.teacher.checkpoint.

ARG (comma-separated): small (tiny model, few steps: tests, smoke runs).
"""
from configs import arithmetic_student
from distill.train.config import parse_options


def get_config(arg=None):
  options = parse_options(arg, {'small': 'tiny model, few steps (tests, smoke runs)'})
  c = arithmetic_student.get_config(','.join(sorted(options)))
  c.algorithm.name = 'distillm'
  c.loss.divergence = 'skew_forward_kl'
  c.loss.kd_weight = 1.0
  c.loss.ce_weight = 0.0
  c.eval_steps = 50
  with c.unlocked():
    c.loss.hparams.alpha = 0.1
    c.algorithm.kwargs.update(
        init_threshold=0.0, threshold_step=0.1, loss_eps=0.1, capacity=1000,
        replay_ratio='decreasing', val_metric='ce', temperature=1.0, top_k=0, top_p=1.0)
  if 'small' in options:
    c.eval_steps = 2
    c.algorithm.kwargs.capacity = 2 * c.data.batch_size
  return c
