"""Rows from a teacher on a server (config.teacher.server), in place of the in-process teacher.

With `teacher.server` set, the method's hooks are swapped for their served counterparts
(`hooks_for`). Rows prepared before their step, the objective unchanged:
  cached_teacher  ServedTopKCache     the cache is written from the server's prompt_logprobs
  topk_online     ServedOnlineTopK    each batch's top-k is fetched on the host before its
                                      step (LOOKAHEAD batches ahead, overlapping the steps)
  seqkd           ServedGenerations   the completions are the server's generations
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
from distill.algorithms import hooks, rollout, seqkd, served_scoring, topk
from distill.algorithms.cache_rows import CacheRows
from distill.algorithms.hooks import ROW_KEYS
from distill.data import teacher_cache
from distill.teacher_client import TeacherUnavailable

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


class _WithServedTopK:
  """A checkpointable batch iterator with the teacher's top-k added to each batch.

  get_state() is the source's state after the last batch handed out, not after the ones
  fetched ahead, so a resumed run sees the same batches as an uninterrupted one.
  take_timing() gives the seconds per batch the loop waited for answers and the requests took.
  """

  def __init__(self, batches, fetch):
    self.batches = batches
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
      (ids, logprobs), request_s = future.result()
    except TeacherUnavailable as e:
      self.pool.shutdown(wait=False, cancel_futures=True)
      raise served_scoring.stopped(e) from e
    self.waited_s += time.perf_counter() - start
    self.request_s += request_s
    self.count += 1
    self.state = state
    self._fill()   # the next batch's request runs during this step
    return {**batch, 'topk_ids': ids, 'topk_logprobs': logprobs}

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
    if served.max_model_len is not None and c.task.prompt_len + c.task.completion_len > served.max_model_len:
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
      prompt_BxP, prompt_mask_BxP = rows['tokens'][:, :prompt_len], rows['input_mask'][:, :prompt_len]
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
           seqkd.TeacherGenerations: ServedGenerations}
SERVED_METHODS = ('cached_teacher', 'topk_online', 'seqkd', 'gkd', 'distillm', 'onpolicy_rkl')


def hooks_for(spec):
  """(rows class, objective class) of a method against a served teacher: its rows hook's
  served counterpart, or its sampled rows scored by the server between the step's two phases
  (distill.algorithms.served_scoring); refused for methods that cannot be served."""
  if spec.rows in _SERVED:
    return _SERVED[spec.rows], spec.objective
  if served_scoring.scores_rows_of(spec):
    return served_scoring.hooks_for(spec)
  raise ValueError(f'algorithm {spec.name!r} runs the teacher inside the training step on its '
                   'own rows, which a served teacher (config.teacher.server) cannot do; served '
                   f'methods: {", ".join(SERVED_METHODS)}. Use config.teacher.checkpoint '
                   'instead.')
