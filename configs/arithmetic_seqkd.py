"""Sequence-level KD (Kim & Rush) of the arithmetic student: the teacher completes the train
prompts once (greedy), the completions are kept in WORKDIR/seqkd, and the student learns
them with cross-entropy. Needs --config.teacher.checkpoint.

ARG (comma-separated): small (tiny model, few steps, 64 prompts: tests, smoke runs);
word (add word-level KD: forward KL to the teacher on the generated sequences).
"""
from configs import arithmetic_student
from distill.train.config import parse_options


def get_config(arg=None):
  options = parse_options(arg, {'small': 'tiny model, few steps (tests, smoke runs)',
                                'word': 'Seq-KD + Word-KD: also forward KL on the sequences'})
  c = arithmetic_student.get_config('small' if 'small' in options else None)
  c.algorithm.name = 'seqkd'
  c.loss.divergence = 'forward_kl'
  c.loss.kd_weight = 0.5 if 'word' in options else 0.0
  c.loss.ce_weight = 0.5 if 'word' in options else 1.0
  with c.unlocked():
    c.algorithm.kwargs.update(num_prompts=64 if 'small' in options else 8192, temperature=0.0,
                              top_k=0, top_p=1.0, rows_per_shard=1024, batch_size=0,
                              cache_dir='')
  return c
