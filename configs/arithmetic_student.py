"""A small student on the embedded arithmetic task.

ARG (comma-separated):
  kd       distil from the teacher in teacher.checkpoint (supervised KD, forward KL,
           mixed with cross-entropy) — the default;
  scratch  ground truth only (cross-entropy), the baseline a distilled student must beat;
  small    tiny model, few steps (tests, smoke runs).
"""
from distill.train.config import base_config, make_small, parse_options


def get_config(arg=None):
  options = parse_options(arg, {
      'kd': 'distil from teacher.checkpoint (default)',
      'scratch': 'ground truth only',
      'small': 'tiny model, few steps'})
  c = base_config()
  c.role = 'student'
  c.task.name = 'arithmetic'
  c.model.preset = 'student-100k'
  c.data.batch_size = 64
  c.total_steps = 500
  c.checkpoint_steps = 250
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 100
  c.wandb.group = 'arithmetic'
  if 'scratch' in options:
    c.loss.kd_weight = 0.0
    c.loss.ce_weight = 1.0
  else:
    c.loss.divergence = 'forward_kl'
    c.loss.kd_weight = 0.5
    c.loss.ce_weight = 0.5
  if 'small' in options:
    make_small(c)
  return c
