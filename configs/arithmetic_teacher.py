"""Teacher for the embedded arithmetic task (chain-of-thought addition), trained on
ground truth with cross-entropy. ARG: 'small' for a seconds-long smoke run."""
from distill.train.config import base_config, make_small, parse_options


def get_config(arg=None):
  options = parse_options(arg, {'small': 'tiny model, few steps (tests, smoke runs)'})
  c = base_config()
  c.role = 'teacher'
  c.task.name = 'arithmetic'
  c.model.preset = 'teacher-1m'
  c.loss.kd_weight = 0.0
  c.loss.ce_weight = 1.0
  c.data.batch_size = 64
  c.total_steps = 500
  c.checkpoint_steps = 250
  c.log_steps = 50
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 100
  c.wandb.group = 'arithmetic'
  if 'small' in options:
    make_small(c)
  return c
