"""TAID (Shing et al., ICLR 2025) on the arithmetic student: KL to an interpolation of the
student's and the teacher's logits whose weight t moves from 0.4 to 1 over training (the
paper's adaptive schedule, t and its momentum in the checkpoint). Needs
--config.teacher.checkpoint.

ARG (comma-separated): small (tiny model, few steps: tests, smoke runs).
"""
from configs import arithmetic_student
from distill.train.config import parse_options


def get_config(arg=None):
  options = parse_options(arg, {'small': 'tiny model, few steps (tests, smoke runs)'})
  c = arithmetic_student.get_config(','.join(sorted(options)))
  c.algorithm.name = 'taid'
  c.loss.divergence = 'forward_kl'
  c.loss.kd_weight = 1.0
  c.loss.ce_weight = 0.0
  with c.unlocked():
    c.algorithm.kwargs.update(t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99)
  return c
