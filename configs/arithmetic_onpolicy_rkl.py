"""On-policy distillation with per-token reverse-KL rewards (as in Qwen3 / "on-policy
distillation") on the arithmetic student: the student samples, the teacher scores the
sampled tokens, advantage −(log q − log p). Needs --config.teacher.checkpoint.

ARG (comma-separated): small (tiny model, few steps: tests, smoke runs).
"""
from configs import arithmetic_student
from distill.train.config import parse_options


def get_config(arg=None):
  options = parse_options(arg, {'small': 'tiny model, few steps (tests, smoke runs)'})
  c = arithmetic_student.get_config(','.join(sorted(options)))
  c.algorithm.name = 'onpolicy_rkl'
  c.loss.divergence = 'reverse_kl'
  c.loss.kd_weight = 1.0
  c.loss.ce_weight = 0.0
  with c.unlocked():
    c.algorithm.kwargs.update(temperature=1.0, top_k=0, top_p=1.0)
  return c
