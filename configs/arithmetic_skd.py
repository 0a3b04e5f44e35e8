"""Speculative KD (Xu et al., ICLR 2025) on the arithmetic student: the student proposes,
tokens outside the teacher's top-25 are replaced by teacher samples, and the loss is the
forward KL to the teacher on the interleaved sequences. Needs --config.teacher.checkpoint.

ARG (comma-separated): small (tiny model, few steps: tests, smoke runs).
"""
from configs import arithmetic_student
from distill.train.config import parse_options


def get_config(arg=None):
  options = parse_options(arg, {'small': 'tiny model, few steps (tests, smoke runs)'})
  c = arithmetic_student.get_config(','.join(sorted(options)))
  c.algorithm.name = 'skd'
  c.loss.divergence = 'forward_kl'
  c.loss.kd_weight = 1.0
  c.loss.ce_weight = 0.0
  with c.unlocked():
    c.algorithm.kwargs.update(top_k_teacher=25, temperature=1.0, top_k=0, top_p=1.0)
  return c
