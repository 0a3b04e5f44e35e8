"""MiniLLM (Gu et al., ICLR 2024) on the arithmetic student: reverse KL by policy gradient
(exact single-step term + length-normalised long-term term) on teacher-mixed samples
(α = 0.2), importance weights clipped at ε = 0.2. Needs --config.teacher.checkpoint.

ARG (comma-separated): small (tiny model, few steps: tests, smoke runs).
"""
from configs import arithmetic_student
from distill.train.config import parse_options


def get_config(arg=None):
  options = parse_options(arg, {'small': 'tiny model, few steps (tests, smoke runs)'})
  c = arithmetic_student.get_config(','.join(sorted(options)))
  c.algorithm.name = 'minillm'
  c.loss.divergence = 'reverse_kl'
  c.loss.kd_weight = 1.0
  c.loss.ce_weight = 0.0
  with c.unlocked():
    c.algorithm.kwargs.update(teacher_mix=0.2, clip_range=0.2, length_norm=True,
                              temperature=1.0, top_k=0, top_p=1.0)
  return c
