"""Rows from a teacher on a server (config.teacher.server), in place of the in-process teacher.

With `teacher.server` set, the method's hooks are swapped for their served counterparts
(`hooks_for`). Rows prepared before their step, the objective unchanged:
  cached_teacher  ServedTopKCache     the cache is written from the server's prompt_logprobs
  topk_online     ServedOnlineTopK    each batch's top-k is fetched on the host before its
                                      step (LOOKAHEAD batches ahead, overlapping the steps)
  seqkd           ServedGenerations   the completions are the server's generations
  cross_tokenizer ServedTeacherTokenRows  each batch's teacher-layout rows scored ahead (each
                                      teacher target's log-prob, the top-k); the objective is
                                      ServedCrossTokenizer (GOLD's span term, ULD's top-k form)
The rows equal the in-process ones to float tolerance (top-k, greedy generations; sampled
generations follow the same distribution, not the same draws, so their cache says so). A
cache written from a distill.serve teacher carries that teacher's fingerprint, the same as
an in-process teacher's: either can reuse it.

Served log-probabilities are at temperature 1 (vLLM's prompt_logprobs are the model's own),
and a top-k alone cannot be renormalised at another temperature, so these rows need
config.loss.temperature = 1. Rows drawn in the step by the student alone (gkd, distillm,
onpolicy_rkl) are scored by the server between the step's two phases
(distill.algorithms.served_scoring). Other methods whose step runs the teacher (Hinton KD on
dataset rows: use topk_online; minillm, skd, taid, hidden_kd) are refused by name.
"""
from __future__ import annotations

import collections
import concurrent.futures
import time

import numpy as np

from distill import sampling
from distill.algorithms import cross_tokenizer, hooks, rollout, seqkd, served_scoring, topk
from distill.algorithms.cache_rows import CacheRows
from distill.algorithms.hooks import ROW_KEYS
from distill.data import teacher_cache
from distill.teacher_client import TeacherClient, TeacherUnavailable, check_tokenizer

LOOKAHEAD = 2   # batches whose top-k is requested before their step


def _check_topk(hook: hooks.Hook) -> None:
  served_scoring.check_scoring(hook, topk.check_k(hook), tokens=False)


class ServedTopKCache(topk.TeacherTopKCache):
  serves_teacher = True

  def check(self) -> None:
    _check_topk(self)
    super().check()

  def teacher_fingerprint(self) -> str:
    return self.run.teacher_server.identity

  def producer(self):
    client, k = self.run.teacher_server, self.options['k']

    def produce(start: int, stop: int):
      rows = teacher_cache.example_rows(self.run, start, stop, stop - start)
      ids, logprobs, _ = client.score_rows(rows, k)
      return {**{f: rows[f] for f in ROW_KEYS}, 'topk_ids': ids,
              'topk_logprobs': logprobs.astype(self.options['logprob_dtype'])}
    return produce


class ServedOnlineTopK(hooks.Rows):
  """Dataset rows with the served teacher's top-k, fetched on the host per batch."""
  DEFAULTS = topk.OnlineTopK.DEFAULTS
  serves_teacher = True
  fields = ROW_KEYS + topk.TOPK_FIELDS

  def check(self) -> None:
    _check_topk(self)

  def train_batches(self, default):
    client, k = self.run.teacher_server, self.options['k']
    return _WithServedTopK(default, lambda batch: client.score_rows(batch, k)[:2])


class ServedTeacherTokenRows(cross_tokenizer.TeacherTokenRows):
  """Rows in both tokenizations with the served teacher's scores of its own rows (teacher
  layout): the log-prob of each of its targets (TEACHER_LOGPROBS) and its top-k (kwarg k;
  0: none), fetched on the host ahead like ServedOnlineTopK's."""
  DEFAULTS = {'k': 0}
  serves_teacher = True
  fields = (cross_tokenizer.TeacherTokenRows.fields + topk.TOPK_FIELDS +
            (served_scoring.TEACHER_LOGPROBS,))

  def check(self) -> None:
    client = self.run.teacher_server
    if not isinstance(client, TeacherClient):
      raise ValueError(f'algorithm {self.config.algorithm.name!r} takes one served teacher, '
                       'not several (config.teachers.more)')
    # The server tokenizes as the teacher does, not as the student.
    check_tokenizer(client, self.run.teacher_tokenizer, 'config.teacher.tokenizer')
    k = self.options['k']
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
      raise self.kwarg_error('k', f'must be an int ≥ 0, got {k!r}')
    served_scoring.check_scoring(self, k, tokens=True)

  def train_batches(self, default):
    client, k = self.run.teacher_server, self.options['k']

    def fetch(batch):
      teacher_layout = {'tokens': batch['teacher_tokens'],
                        'input_mask': batch['teacher_input_mask'],
                        'loss_mask': batch['teacher_loss_mask']}
      return client.score_rows(teacher_layout, k, tokens=True)
    return _WithServedTopK(default, fetch,
                           fields=topk.TOPK_FIELDS + (served_scoring.TEACHER_LOGPROBS,))


class ServedCrossTokenizer(cross_tokenizer.CrossTokenizer):
  """The cross-tokenizer losses from the served rows' scores; nothing runs the teacher in the
  step. GOLD's span term is exact (a span's probability is the product of its tokens', whose
  log-probs the server returns); ULD is its top-k form (distill.losses.cross_tokenizer.
  uld_topk: exact at k = V_teacher − 1). GOLD's vocab term has no tested top-k form: refused."""

  def check(self) -> None:
    super().check()
    if self.options['loss'] == 'gold' and self.options['vocab_weight']:
      raise self.kwarg_error(
          'vocab_weight', f'is not served (it is {self.options["vocab_weight"]}): the vocab '
          'term compares the distributions over the shared vocabulary, of which a served teacher '
          'gives only a top-k (a top-k form is not built). With config.teacher.server set '
          'kwargs.vocab_weight=0 (the span term is exact from the served log-probs), or use '
          'config.teacher.checkpoint')

  def check_rows(self, rows) -> None:
    k, loss = rows.options['k'], self.options['loss']
    if loss == 'uld' and not k:
      raise rows.kwarg_error('k', 'must be ≥ 1 for kwargs.loss=\'uld\' with a served teacher '
                             '(ULD over its top-k and the tail; k = V_teacher − 1 is exact)')
    if loss == 'gold' and k:
      raise rows.kwarg_error('k', f'is unused by kwargs.loss=\'gold\' (it is {k}; the span '
                             'term needs only the log-prob of each teacher token): leave it 0')

  def teacher_outputs(self, ctx, teacher_params, rows):
    del ctx, teacher_params, rows
    return None


class _WithServedTopK:
  """A checkpointable batch iterator with the teacher's scores added to each batch: fetch(batch)
  gives the arrays of `fields` (by default its top-k).

  get_state() is the source's state after the last batch handed out, not after the ones
  fetched ahead, so a resumed run sees the same batches as an uninterrupted one.
  take_timing() gives the seconds per batch the loop waited for answers and the requests took.
  """

  def __init__(self, batches, fetch, fields: tuple[str, ...] = topk.TOPK_FIELDS):
    self.batches, self.fields = batches, fields
    self.waited_s, self.request_s, self.count = 0.0, 0.0, 0

    def timed_fetch(batch):
      start = time.perf_counter()
      answer = fetch(batch)
      return answer, time.perf_counter() - start
    self.fetch = timed_fetch
    self.state = batches.get_state()
    self.pending = collections.deque()   # (source state after the batch, batch, future)
    self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='served-topk')

  def __iter__(self):
    return self

  def _fill(self) -> None:
    while len(self.pending) < LOOKAHEAD:
      batch = next(self.batches)
      self.pending.append((self.batches.get_state(), batch, self.pool.submit(self.fetch, batch)))

  def __next__(self) -> dict:
    self._fill()
    state, batch, future = self.pending.popleft()
    start = time.perf_counter()
    try:
      scores, request_s = future.result()
    except TeacherUnavailable as e:
      self.pool.shutdown(wait=False, cancel_futures=True)
      raise served_scoring.stopped(e) from e
    self.waited_s += time.perf_counter() - start
    self.request_s += request_s
    self.count += 1
    self.state = state
    self._fill()   # the next batch's request runs during this step
    return {**batch, **dict(zip(self.fields, scores, strict=True))}

  def take_timing(self) -> dict:
    """{teacher_s: seconds waited per batch, teacher_request_s: request seconds per batch}
    since the last call (distill.train.monitor)."""
    n = max(self.count, 1)
    timing = {'teacher_s': self.waited_s / n, 'teacher_request_s': self.request_s / n}
    self.waited_s, self.request_s, self.count = 0.0, 0.0, 0
    return timing

  def get_state(self):
    return self.state

  def set_state(self, state) -> None:
    for _, _, future in self.pending:
      future.cancel()
    self.pending.clear()
    self.batches.set_state(state)
    self.state = state


class ServedGenerations(seqkd.TeacherGenerations):
  serves_teacher = True

  def check(self) -> None:
    c, served = self.config, self.run.teacher_server.served
    if self.run.teacher_params is None and c.loss.kd_weight > 0:
      raise ValueError('seqkd with only a served teacher trains on its generations alone: set '
                       'config.loss.kd_weight=0, or also set config.teacher.checkpoint for '
                       'word-level KD (the step runs that teacher)')
    self.sampling = rollout.sampling_config(self)
    seq_len = c.task.prompt_len + c.task.completion_len
    if served.max_model_len is not None and seq_len > served.max_model_len:
      raise ValueError(f'algorithm seqkd: prompt_len + completion_len exceeds the served '
                       f'teacher\'s max_model_len {served.max_model_len}')
    CacheRows.check(self)

  def teacher_fingerprint(self) -> str:
    return self.run.teacher_server.identity

  def identity_settings(self) -> dict:
    settings = super().identity_settings()
    if self.options['temperature'] > 0:   # the server draws other samples than the step would
      settings['sampled_by'] = 'server'
    return settings

  def producer(self):
    client, cfg = self.run.teacher_server, self.sampling
    prompt_len, seed = self.config.task.prompt_len, self.config.seed

    def produce(start: int, stop: int):
      rows = teacher_cache.example_rows(self.run, start, stop, stop - start)
      prompt_BxP = rows['tokens'][:, :prompt_len]
      prompt_mask_BxP = rows['input_mask'][:, :prompt_len]
      completions = client.generate(
          [p[m != 0].tolist() for p, m in zip(prompt_BxP, prompt_mask_BxP)],
          max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
          top_p=cfg.top_p, seed=seed * 2**20 + start)
      tokens_BxN = np.full((stop - start, cfg.max_new_tokens), cfg.pad_id, np.int32)
      mask_BxN = np.zeros_like(tokens_BxN)
      for row, completion in enumerate(completions):
        tokens_BxN[row, :len(completion)], mask_BxN[row, :len(completion)] = completion, 1
      batch = sampling.training_batch(prompt_BxP, prompt_mask_BxP,
                                      {'tokens_BxN': tokens_BxN, 'mask_BxN': mask_BxN}, cfg.pad_id)
      return {f: np.asarray(batch[f]) for f in ROW_KEYS}
    return produce


_SERVED = {topk.TeacherTopKCache: ServedTopKCache, topk.OnlineTopK: ServedOnlineTopK,
           seqkd.TeacherGenerations: ServedGenerations,
           cross_tokenizer.TeacherTokenRows: ServedTeacherTokenRows}
# Objectives that read the served rows' fields instead of running the teacher in the step.
_SERVED_OBJECTIVES = {cross_tokenizer.CrossTokenizer: ServedCrossTokenizer}
SERVED_METHODS = ('cached_teacher', 'topk_online', 'seqkd', 'gkd', 'distillm', 'onpolicy_rkl',
                  'cross_tokenizer')


def hooks_for(spec):
  """(rows class, objective class) of a method against a served teacher: its rows hook's
  served counterpart, or its sampled rows scored by the server between the step's two phases
  (distill.algorithms.served_scoring); refused for methods that cannot be served."""
  if spec.rows in _SERVED:
    return _SERVED[spec.rows], _SERVED_OBJECTIVES.get(spec.objective, spec.objective)
  if served_scoring.scores_rows_of(spec):
    return served_scoring.hooks_for(spec)
  raise ValueError(f'algorithm {spec.name!r} runs the teacher inside the training step on its '
                   'own rows, which a served teacher (config.teacher.server) cannot do; served '
                   f'methods: {", ".join(SERVED_METHODS)}. Use config.teacher.checkpoint '
                   'instead.')
