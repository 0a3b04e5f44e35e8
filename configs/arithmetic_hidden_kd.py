"""Hidden-state KD of the arithmetic student: forward KL mixed with cross-entropy on the
logits, plus the cosine distance between each student layer and the teacher layer at the
same relative depth (through learned projections when the widths differ, as for the
student-100k / teacher-1m pair). Needs --config.teacher.checkpoint.

ARG (comma-separated): small (tiny model, few steps: tests, smoke runs); mse (TinyBERT's
MSE instead of the cosine).
"""
from configs import arithmetic_student
from distill.train.config import parse_options


def get_config(arg=None):
  options = parse_options(arg, {'small': 'tiny model, few steps (tests, smoke runs)',
                                'mse': 'mean squared error instead of cosine distance'})
  c = arithmetic_student.get_config('small' if 'small' in options else None)
  c.algorithm.name = 'hidden_kd'
  c.loss.divergence = 'forward_kl'
  c.loss.kd_weight = 0.5
  c.loss.ce_weight = 0.5
  with c.unlocked():
    c.algorithm.kwargs.update(layer_map='', kind='mse' if 'mse' in options else 'cosine',
                              weight=1.0, positions='completion')
  return c
