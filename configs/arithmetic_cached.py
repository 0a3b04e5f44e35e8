"""Top-k KD of the arithmetic student from a teacher-logit cache: one teacher pass writes its
top-16 log-probs for the first train examples to WORKDIR/teacher_cache (or kwargs.cache_dir,
shared by a sweep), then training reads them (forward KL over the top-k with the missing
mass as one bucket, mixed with cross-entropy). Needs --config.teacher.checkpoint.

ARG (comma-separated): small (tiny model, few steps, 64 cached rows: tests, smoke runs);
online (the same loss with the top-k computed by the teacher in every step, no cache).
"""
from configs import arithmetic_student
from distill.train.config import parse_options


def get_config(arg=None):
  options = parse_options(arg, {'small': 'tiny model, few steps (tests, smoke runs)',
                                'online': 'top-k from the teacher in every step, no cache'})
  c = arithmetic_student.get_config('small' if 'small' in options else None)
  c.loss.divergence = 'forward_kl'
  c.loss.kd_weight = 0.5
  c.loss.ce_weight = 0.5
  with c.unlocked():
    c.algorithm.kwargs.update(k=16, tail='bucket')
    if 'online' in options:
      c.algorithm.name = 'topk_online'
    else:
      c.algorithm.name = 'cached_teacher'
      c.algorithm.kwargs.update(num_rows=64 if 'small' in options else 16384,
                                rows_per_shard=1024, logprob_dtype='float32', batch_size=0,
                                cache_dir='')
  return c
