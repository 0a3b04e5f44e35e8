"""Scoring requests of concurrent connections run together: one forward pass for many.

Each HTTP connection has its own thread; without batching each request's rows make their
own forward pass, one after the other behind the engine's lock. `ScoreBatcher.score` instead
queues the request; one worker thread takes the first waiting request, gathers those that
arrive within `wait_s` (up to `max_rows` rows), scores all their prompts in one call at the
largest k asked (a top-k of a larger k begins with the smaller one's, so each request gets
its own k by slicing) and hands each request its rows. A request's rows are scored as they
would be alone, up to the float rounding of a different padded batch shape.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Callable


@dataclasses.dataclass
class _Request:
  prompts: list
  k: int
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  result: object = None
  error: BaseException | None = None


class ScoreBatcher:
  """score(prompts, k) from any thread; `score_now(prompts, k) -> Scores` does the work."""

  def __init__(self, score_now: Callable, *, max_rows: int, wait_s: float):
    self.score_now, self.max_rows, self.wait_s = score_now, max_rows, wait_s
    self.requests: queue.Queue[_Request] = queue.Queue()
    self.batches_run = 0   # forward calls made (tests and benchmarks read it)
    threading.Thread(target=self._serve, daemon=True, name='score-batcher').start()

  def score(self, prompts: list, k: int):
    request = _Request(prompts, k)
    self.requests.put(request)
    request.done.wait()
    if request.error is not None:
      raise request.error
    return request.result

  def _gather(self) -> list[_Request]:
    group = [self.requests.get()]
    rows, deadline = len(group[0].prompts), time.monotonic() + self.wait_s
    while rows < self.max_rows:
      try:
        request = self.requests.get(timeout=max(deadline - time.monotonic(), 0.0))
      except queue.Empty:
        break
      group.append(request)
      rows += len(request.prompts)
    return group

  def _serve(self) -> None:
    while True:
      group = self._gather()
      try:
        scores = self.score_now([p for r in group for p in r.prompts], max(r.k for r in group))
        self.batches_run += 1
        first = 0
        for request in group:
          rows = slice(first, first + len(request.prompts))
          request.result = type(scores)(
              [ids[:, :request.k] for ids in scores.topk_ids[rows]],
              [lp[:, :request.k] for lp in scores.topk_logprobs[rows]],
              scores.token_logprobs[rows], scores.token_ranks[rows])
          first = rows.stop
      except Exception as e:  # noqa: BLE001 - every waiting request hears of it
        for request in group:
          request.error = e
      for request in group:
        request.done.set()
