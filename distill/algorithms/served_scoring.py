"""On-policy rows scored by a served teacher (config.teacher.server): the step in two phases.

Methods whose rows are drawn in the step without the teacher — the student's samples
(onpolicy_rkl, gkd), replayed or dataset rows mixed in (distillm, gkd at λ < 1) — train
against a served teacher so (distill.train.step.HostScoredStep): the jitted draw phase
samples this step's rows, they go to the host, the server scores them (POST /v1/completions
with echo, max_tokens 0 and prompt_logprobs = k, the request the top-k cache makes), and
the jitted update phase computes the loss from the fields it returned:

  method's objective             served objective      fields from the server
  config.loss (Divergence)       TopKForwardKL         topk_ids, topk_logprobs [B, T, k]
  ReverseKLPerToken              the same, with log p  teacher_logprobs [B, T] (the log-prob
    (onpolicy_rkl)               read from the rows    of each sampled token; k = 0)

A server returns log-probs of its top-k, never its logits, so config.loss's full-vocabulary
divergence becomes forward KL over the top-k with the tail as one outcome or ignored (kwargs
k and tail, as topk_online): config.loss.divergence must be forward_kl. With tail='bucket'
and k = V − 1 the top-k outcomes and the bucket are the whole vocabulary, so it is the full
forward KL. onpolicy_rkl needs only each sampled token's log-prob, which vLLM reports for
every prompt token beside the top-k (prompt_logprobs = 0 asks for nothing more): the same
numbers as the in-process teacher's, so the training equals it (tests/test_serve.py).

Refused by name: rows that run the teacher while sampling (minillm's teacher-mixed tokens,
skd's proposals, gkd with seq_kd): every decoded token would be a round trip; objectives
other than these two need the teacher's logits or hidden states inside the step.

The step waits for the server: the rows depend on this step's parameters, so nothing can be
fetched ahead. teacher_s (distill.train.monitor) is the time per step spent in the requests.
A server that stops answering stops the run before the step's update, the last checkpoint
intact; the same command resumes exactly (the samples come from the step's rng).
"""
from __future__ import annotations

import time

import jax
import numpy as np

from distill.algorithms import divergence, hooks, policy_gradient, rollout, topk
from distill.teacher_client import TeacherUnavailable

TEACHER_LOGPROBS = 'teacher_logprobs'   # [B, T] fp32: the served teacher's log p(target)


def check_scoring(hook: hooks.Hook, k: int, tokens: bool) -> None:
  """What a served teacher must allow for scores of rows: temperature 1 (servers return the
  model's own log-probs), a top-k of k (the server's limit named), the rows' length."""
  if k and hook.config.loss.temperature != 1:
    raise ValueError(f'config.loss.temperature={hook.config.loss.temperature} with a served '
                     'teacher: servers return log-probs at temperature 1 and a top-k cannot be '
                     'renormalised at another; set it to 1')
  client = hook.run.teacher_server
  limit = client.served.max_model_len
  if limit is not None and hook.run.seq_len > limit:
    raise ValueError(f'algorithm {hook.config.algorithm.name!r}: prompt_len + completion_len = '
                     f'{hook.run.seq_len} exceeds the served teacher\'s max_model_len {limit}')
  client.check_topk(k, tokens=tokens)


def stopped(error: TeacherUnavailable) -> TeacherUnavailable:
  """The error that stops a run whose server stopped answering, saying how to resume."""
  return TeacherUnavailable(f'{error}. Training stopped before this step; its last checkpoint '
                            'is intact: restart the teacher server and run the same command '
                            'to resume.')


def scored_rows(rows_cls: type[hooks.Rows], *, topk_scores: bool,
                tokens: bool) -> type[hooks.Rows]:
  """rows_cls whose drawn rows the served teacher scores on the host: its top-k
  (topk_scores; kwarg k) and/or each target's log-prob (tokens)."""

  class Scored(rows_cls):
    DEFAULTS = {**rows_cls.DEFAULTS, **(topk.OnlineTopK.DEFAULTS if topk_scores else {})}
    fields = (tuple(rows_cls.fields) + (topk.TOPK_FIELDS if topk_scores else ()) +
              ((TEACHER_LOGPROBS,) if tokens else ()))
    serves_teacher = True
    host_scored = True

    def check(self) -> None:
      # gkd's seq_kd makes the teacher sample the off-policy rows.
      if self.teacher_generates or self.options.get('seq_kd') is True:
        raise ValueError(f'algorithm {self.config.algorithm.name!r} with seq_kd samples from '
                         'the teacher inside the step, which a served teacher cannot do; set '
                         'config.algorithm.kwargs.seq_kd=False')
      if jax.process_count() > 1:
        raise ValueError('a served teacher scores the student\'s samples from one process; '
                         f'this run has {jax.process_count()}')
      super().check()
      self.k = topk.check_k(self) if topk_scores else 0
      check_scoring(self, self.k, tokens)
      self.request_s, self.steps = 0.0, 0

    def host_fields(self, batch_size: int, seq_len: int) -> dict:
      shape = (batch_size, seq_len)
      fields = {}
      if topk_scores:
        fields = {'topk_ids': (shape + (self.k,), np.int32),
                  'topk_logprobs': (shape + (self.k,), np.float32)}
      if tokens:
        fields[TEACHER_LOGPROBS] = (shape, np.float32)
      return fields

    def score_on_host(self, rows: dict) -> dict:
      start = time.perf_counter()
      try:
        scores = self.run.teacher_server.score_rows(rows, self.k, tokens=tokens)
      except TeacherUnavailable as e:
        raise stopped(e) from e
      self.request_s += time.perf_counter() - start
      self.steps += 1
      fields = {}
      if topk_scores:
        fields = {'topk_ids': scores.topk_ids, 'topk_logprobs': scores.topk_logprobs}
      if tokens:
        fields[TEACHER_LOGPROBS] = scores.token_logprobs
      return fields

    def take_timing(self) -> dict:
      """{teacher_s: seconds per step in the server's requests} since the last call."""
      timing = {'teacher_s': self.request_s / max(self.steps, 1)}
      self.request_s, self.steps = 0.0, 0
      return timing

  Scored.__name__ = Scored.__qualname__ = f'Served{rows_cls.__name__}'
  return Scored


class ServedReverseKLPerToken(policy_gradient.ReverseKLPerToken):
  """onpolicy_rkl's objective with the teacher's log-probs of the sampled tokens from the
  server (the rows' teacher_logprobs) instead of the in-process teacher."""
  needs_fields = hooks.ROW_KEYS + (TEACHER_LOGPROBS,)

  def teacher_scores(self, ctx, teacher_params, rows):
    del ctx, teacher_params
    return rows[TEACHER_LOGPROBS], None, None


# The method's objective -> (its served objective, what the server scores).
_OBJECTIVES = {
    divergence.Divergence: (topk.TopKForwardKL, dict(topk_scores=True, tokens=False)),
    policy_gradient.ReverseKLPerToken: (ServedReverseKLPerToken,
                                        dict(topk_scores=False, tokens=True)),
}


def scores_rows_of(spec) -> bool:
  """Whether `spec`'s rows are drawn in the step without the teacher (so a server can score
  them between the step's phases)."""
  return issubclass(spec.rows, rollout.Sampled)


def hooks_for(spec):
  """(rows class, objective class) of an on-policy method against a served teacher."""
  if spec.rows.teacher_generates:
    raise ValueError(f'algorithm {spec.name!r} samples with the teacher at every decoded token '
                     f'({spec.rows.__name__}), which a served teacher (config.teacher.server) '
                     'cannot do: each token would be a round trip. Use '
                     'config.teacher.checkpoint, or an on-policy method whose student samples '
                     'alone (gkd, distillm, onpolicy_rkl)')
  if spec.objective not in _OBJECTIVES:
    raise ValueError(f'algorithm {spec.name!r} minimises {spec.objective.__name__}, which needs '
                     'the teacher\'s logits or hidden states inside the step; a served teacher '
                     '(config.teacher.server) gives top-k log-probs, which config.loss '
                     '(forward_kl over the top-k) and onpolicy_rkl use')
  objective, scores = _OBJECTIVES[spec.objective]
  return scored_rows(spec.rows, **scores), objective
