"""On-policy GKD (Agarwal et al., ICLR 2024) of the arithmetic student.

With probability lmbda a step trains on the student's own samples of the batch's prompts,
otherwise on the dataset (seq_kd=True: on teacher samples); the loss is the generalized
JSD(β=0.5) to the teacher, no ground-truth CE. Needs --config.teacher.checkpoint.

ARG (comma-separated): small (tiny model, few steps: tests, smoke runs).
"""
from configs import arithmetic_student
from distill.train.config import parse_options


def get_config(arg=None):
  options = parse_options(arg, {'small': 'tiny model, few steps (tests, smoke runs)'})
  c = arithmetic_student.get_config(','.join(sorted(options)))
  c.algorithm.name = 'gkd'
  c.loss.divergence = 'jsd'
  c.loss.kd_weight = 1.0
  c.loss.ce_weight = 0.0
  with c.unlocked():
    c.loss.hparams.beta = 0.5
    c.algorithm.kwargs.update(lmbda=0.5, seq_kd=False, temperature=1.0, top_k=0, top_p=1.0)
  return c
