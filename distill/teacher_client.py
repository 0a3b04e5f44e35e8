"""A teacher on a server: a client of vLLM's OpenAI-compatible completions protocol.

Works with `python -m distill.serve` and with `vllm serve MODEL --max-logprobs K` (and any
server with the same fields). What it asks for:
  top-k of every position    {"prompt": [[ids...], ...], "max_tokens": 0, "echo": true,
                              "prompt_logprobs": k}; choices[i].prompt_logprobs[j] is the
                             teacher's distribution of token j given tokens < j, and
                             the log-prob of token j itself (on-policy scoring of samples)
  generations                {"prompt": [[ids...], ...], "max_tokens": N, "temperature": ...,
                              "logprobs": 0, "return_tokens_as_token_ids": true}; the
                             completion's ids are read from logprobs.tokens ('token_id:N')
Rows are sent `rows_per_request` to a request, up to `concurrency` requests at a time.

Faults: a connection error, a timeout or a 5xx answer is retried with exponential backoff
(`retries` times, then TeacherUnavailable naming the URL); a 4xx answer is the request's
fault and is raised at once with the server's message (e.g. k above its --max-logprobs). A
response without a field it needs, or with a malformed one, raises MalformedResponse naming
the field: it never turns into zeros. Every response's system_fingerprint (distill.serve
sends the model's) must stay the one seen at connection time.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import threading
import time
from typing import NamedTuple

import numpy as np
import requests


class TeacherServerError(RuntimeError):
  """The server refused a request or serves something else than the run expects."""


class TeacherUnavailable(TeacherServerError):
  """The server did not answer within the retries."""


class MalformedResponse(TeacherServerError):
  """A response lacks a field the client needs or has one of the wrong form."""


@dataclasses.dataclass(frozen=True)
class ClientOptions:
  timeout_s: float = 120.0        # per request
  retries: int = 5                # after the first attempt, for connection errors and 5xx
  backoff_s: float = 0.5          # first wait; doubles per retry, at most max_backoff_s
  max_backoff_s: float = 30.0
  rows_per_request: int = 32
  concurrency: int = 4            # requests in flight at once


@dataclasses.dataclass(frozen=True)
class ServedModel:
  """What /v1/models says about the served model (distill.serve adds the fingerprints)."""
  name: str
  max_model_len: int | None
  fingerprint: str | None         # None: a server that does not report one (vLLM)
  tokenizer_fingerprint: str | None
  max_logprobs: int | None


def _field(value, path: str, kind, check=None):
  """`value` if it is a `kind` (and passes `check`), else MalformedResponse naming `path`."""
  if isinstance(value, bool) or not isinstance(value, kind) or (check and not check(value)):
    raise MalformedResponse(f'{path} is {value!r}')
  return value


class PromptScores(NamedTuple):
  """One sequence of n tokens scored (row j: what follows tokens 0..j)."""
  ids: np.ndarray                     # [n-1, k] int32, best first
  logprobs: np.ndarray                # [n-1, k] fp32
  token_logprobs: np.ndarray | None   # [n-1] fp32: of token j+1 itself (when asked for)


class RowScores(NamedTuple):
  """Rows of the pipeline's layout scored (position t: token t+1), zeros off the loss mask."""
  topk_ids: np.ndarray                # [B, T, k] int32
  topk_logprobs: np.ndarray           # [B, T, k] fp32
  token_logprobs: np.ndarray | None   # [B, T] fp32: of each row's target (when asked for)


class TeacherClient:
  def __init__(self, url: str, *, model: str = '', options: ClientOptions = ClientOptions()):
    self.url = url.rstrip('/')
    self.options = options
    self.requested_model = model
    self._local = threading.local()   # one requests.Session per thread
    self.served: ServedModel | None = None

  # ---------------------------------------------------------------- transport

  def _session(self) -> requests.Session:
    if not hasattr(self._local, 'session'):
      self._local.session = requests.Session()
    return self._local.session

  def request(self, method: str, path: str, body: dict | None = None) -> dict:
    """The JSON answer of one call, retried on connection errors, timeouts and 5xx."""
    opts = self.options
    started, last = time.monotonic(), ''
    for attempt in range(opts.retries + 1):
      if attempt:
        time.sleep(min(opts.backoff_s * 2 ** (attempt - 1), opts.max_backoff_s))
      try:
        answer = self._session().request(method, self.url + path, json=body,
                                         timeout=opts.timeout_s)
      except requests.RequestException as e:
        last = f'{type(e).__name__}: {e}'
        self._local.__dict__.pop('session', None)   # a broken connection is not reused
        continue
      if answer.status_code >= 500:
        last = f'HTTP {answer.status_code}: {answer.text[:500]}'
        continue
      if answer.status_code >= 400:
        raise TeacherServerError(f'teacher server {self.url} refused {method} {path} '
                                 f'(HTTP {answer.status_code}): {_error_message(answer)}')
      try:
        return answer.json()
      except ValueError:
        raise MalformedResponse(f'teacher server {self.url}: {method} {path} answered with a '
                                f'body that is not JSON: {answer.text[:200]!r}') from None
    raise TeacherUnavailable(
        f'teacher server {self.url} did not answer {method} {path} after {opts.retries + 1} '
        f'attempts over {time.monotonic() - started:.1f}s; last error: {last}')

  # ---------------------------------------------------------------- the served model

  def connect(self) -> ServedModel:
    """Reads /v1/models (retrying while the server starts) and picks the served model."""
    answer = self.request('GET', '/v1/models')
    try:
      cards = _field(answer.get('data'), 'GET /v1/models: data', list, len)
      names = [_field(c.get('id'), f'GET /v1/models: data[{i}].id', str)
               for i, c in enumerate(cards)]
    except MalformedResponse as e:
      raise MalformedResponse(f'teacher server {self.url}: {e}') from None
    if self.requested_model:
      if self.requested_model not in names:
        raise TeacherServerError(f'teacher server {self.url} serves {names}, not '
                                 f'{self.requested_model!r} (config.teacher.server_model)')
      card = cards[names.index(self.requested_model)]
    elif len(cards) > 1:
      raise TeacherServerError(f'teacher server {self.url} serves several models {names}: name '
                               'one with config.teacher.server_model')
    else:
      card = cards[0]
    extra = card.get('distill') or {}
    self.served = ServedModel(card['id'], card.get('max_model_len'), extra.get('model_fingerprint'),
                              extra.get('tokenizer_fingerprint'), extra.get('max_logprobs'))
    return self.served

  @property
  def identity(self) -> str:
    """What identifies the teacher in a cache's identity: the model fingerprint the server
    reports, else (a server that reports none) its URL and model name."""
    return self.served.fingerprint or f'served:{self.url}/{self.served.name}'

  def check_topk(self, k: int, *, tokens: bool = False) -> None:
    """A one-position probe: the server's refusal of k (e.g. above its --max-logprobs), or an
    answer without the log-prob of the prompt's own token when `tokens`, is raised before
    training, naming the server's limit or the missing field."""
    try:
      self.prompt_topk([[0, 0]], k, tokens=tokens)
    except TeacherUnavailable:
      raise
    except TeacherServerError as e:
      raise TeacherServerError(f'the served teacher cannot give a top-{k} '
                               f'(config.algorithm.kwargs.k={k}): {e}') from None

  def _complete(self, body: dict) -> dict:
    answer = self.request('POST', '/v1/completions', {'model': self.served.name, **body})
    seen = answer.get('system_fingerprint')
    if self.served.fingerprint is not None and seen != self.served.fingerprint:
      raise TeacherServerError(
          f'teacher server {self.url} now serves model fingerprint {seen!r}, not '
          f'{self.served.fingerprint!r} it served when the run started: refused')
    return answer

  def _in_requests(self, items: list, one_request):
    """one_request(first, chunk) over chunks of rows_per_request items (first: the chunk's
    offset in items), concurrently; the results in items' order."""
    size = self.options.rows_per_request
    firsts = range(0, len(items), size)
    if len(firsts) == 1:
      return one_request(0, items)
    with concurrent.futures.ThreadPoolExecutor(self.options.concurrency) as pool:
      parts = pool.map(lambda first: one_request(first, items[first:first + size]), firsts)
      return [x for part in parts for x in part]

  # ---------------------------------------------------------------- top-k

  def prompt_topk(self, sequences: list[list[int]], k: int, *,
                  tokens: bool = False) -> list[PromptScores]:
    """PromptScores per sequence of n tokens: row j is the teacher's top-k for token j+1 given
    tokens 0..j, best first (k = 0: none), and with `tokens` the log-prob of token j+1 itself
    (vLLM puts the prompt's own token in every prompt_logprobs entry, in the top-k or not)."""
    def one_request(first, chunk):
      del first
      answer = self._complete({'prompt': chunk, 'max_tokens': 0, 'echo': True,
                               'prompt_logprobs': k})
      try:
        choices = _field(answer.get('choices'), 'choices', list,
                         lambda c: len(c) == len(chunk))
        return [_parse_prompt_logprobs(c, i, seq, k, tokens)
                for i, (c, seq) in enumerate(zip(choices, chunk))]
      except MalformedResponse as e:
        raise MalformedResponse(f'teacher server {self.url}: malformed response to a top-k '
                                f'request: {e}') from None
    return self._in_requests(sequences, one_request)

  def score_rows(self, batch: dict, k: int, *, tokens: bool = False) -> RowScores:
    """The teacher's scores of rows in the pipeline's layout, at position t those of token
    t+1, zeros where loss_mask is 0 (as distill.algorithms.topk.teacher_topk and
    policy_gradient.target_logprobs give them in the step): topk_ids / topk_logprobs
    [B, T, k] and, with `tokens`, token_logprobs [B, T], the log-prob of each row's target."""
    tokens_BxT, input_mask = np.asarray(batch['tokens']), np.asarray(batch['input_mask']) != 0
    loss_mask = np.asarray(batch['loss_mask']) != 0
    B, T = tokens_BxT.shape
    out = RowScores(np.zeros((B, T, k), np.int32), np.zeros((B, T, k), np.float32),
                    np.zeros((B, T), np.float32) if tokens else None)
    rows = [b for b in range(B) if loss_mask[b].any()]
    # Real tokens are contiguous (left-padded prompt, right-padded completion).
    starts = [int(np.argmax(input_mask[b])) for b in rows]
    sequences = [tokens_BxT[b][input_mask[b]].tolist() for b in rows]
    for b, start, seq, scores in zip(rows, starts, sequences,
                                     self.prompt_topk(sequences, k, tokens=tokens)):
      positions = np.flatnonzero(loss_mask[b])
      if positions.min() < start or positions.max() >= start + len(seq) - 1:
        raise ValueError(f'row {b}: loss_mask marks positions whose next token is padding')
      out.topk_ids[b, positions] = scores.ids[positions - start]
      out.topk_logprobs[b, positions] = scores.logprobs[positions - start]
      if tokens:
        out.token_logprobs[b, positions] = scores.token_logprobs[positions - start]
    return out

  # ---------------------------------------------------------------- generation

  def generate(self, prompts: list[list[int]], *, max_tokens: int, temperature: float,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> list[list[int]]:
    """The completion ids of each prompt (EOS included when the teacher emitted it). Each
    request's seed is `seed` plus the offset of its first prompt, so requests draw apart."""
    def one_request(first, chunk):
      body = {'prompt': chunk, 'max_tokens': max_tokens, 'temperature': temperature,
              'top_k': top_k, 'top_p': top_p, 'logprobs': 0,
              'return_tokens_as_token_ids': True}
      if seed is not None:
        body['seed'] = seed + first
      answer = self._complete(body)
      try:
        choices = _field(answer.get('choices'), 'choices', list, lambda c: len(c) == len(chunk))
        return [_parse_completion_ids(c, i, max_tokens) for i, c in enumerate(choices)]
      except MalformedResponse as e:
        raise MalformedResponse(f'teacher server {self.url}: malformed response to a '
                                f'generation request: {e}') from None
    return self._in_requests(prompts, one_request)


def _error_message(answer) -> str:
  try:
    body = answer.json()
  except ValueError:
    return answer.text[:500]
  error = body.get('error') if isinstance(body, dict) else None
  if isinstance(error, dict):       # vLLM >= 0.10: {"error": {"message": ...}}
    return str(error.get('message'))
  if isinstance(body, dict) and 'message' in body:   # older vLLM: {"object": "error", ...}
    return str(body['message'])
  return str(body)[:500]


def _parse_prompt_logprobs(choice, index: int, sequence: list[int], k: int,
                           tokens: bool) -> PromptScores:
  where, n = f'choices[{index}].prompt_logprobs', len(sequence)
  positions = _field(_field(choice, f'choices[{index}]', dict).get('prompt_logprobs'), where,
                     list, lambda p: len(p) == n)
  ids = np.zeros((n - 1, k), np.int32)
  logprobs = np.zeros((n - 1, k), np.float32)
  token_logprobs = np.zeros((n - 1,), np.float32) if tokens else None
  for j in range(1, n):
    entries = _field(positions[j], f'{where}[{j}]', dict)
    ranked = []
    for token, entry in entries.items():
      path = f'{where}[{j}][{token!r}]'
      _field(token, f'{path} (key)', str, lambda s: s.isdigit())
      entry = _field(entry, path, dict)
      logprob = _field(entry.get('logprob'), f'{path}.logprob', (int, float),
                       lambda x: math.isfinite(x) or x == -math.inf)
      rank = _field(entry.get('rank'), f'{path}.rank', int, lambda r: r >= 1)
      ranked.append((rank, int(token), logprob))
    top = sorted(r for r in ranked if r[0] <= k)
    if [r[0] for r in top] != list(range(1, k + 1)):
      raise MalformedResponse(f'{where}[{j}] has ranks {sorted(r[0] for r in ranked)}, not the '
                              f'top {k} (ranks 1..{k})')
    ids[j - 1] = [t for _, t, _ in top]
    logprobs[j - 1] = [lp for _, _, lp in top]
    if tokens:
      own = [lp for _, t, lp in ranked if t == sequence[j]]
      if not own:
        raise MalformedResponse(f"{where}[{j}]['{sequence[j]}'] (the log-prob of the prompt's "
                                f'own token {sequence[j]}) is missing')
      token_logprobs[j - 1] = own[0]
  return PromptScores(ids, logprobs, token_logprobs)


def _parse_completion_ids(choice, index: int, max_tokens: int) -> list[int]:
  where = f'choices[{index}].logprobs.tokens'
  logprobs = _field(_field(choice, f'choices[{index}]', dict).get('logprobs'),
                    f'choices[{index}].logprobs', dict)
  tokens = _field(logprobs.get('tokens'), where, list, lambda t: len(t) <= max_tokens)
  return [int(_field(t, f'{where}[{i}]', str,
                     lambda s: s.startswith('token_id:') and s[9:].isdigit())[9:])
          for i, t in enumerate(tokens)]


def check_tokenizer(client: TeacherClient, tokenizer, source: str) -> None:
  """Refuses a server whose reported tokenizer is not `tokenizer` (named by `source`)."""
  served = client.served
  fingerprint = served.tokenizer_fingerprint
  if fingerprint is not None and fingerprint != tokenizer.fingerprint():
    raise TeacherServerError(f'teacher server {client.url} (model {served.name!r}) uses tokenizer '
                             f'{fingerprint}, this run uses '
                             f'{tokenizer.fingerprint()} ({source}): refused')


def open_for_run(config, tokenizer, local_fingerprint: str | None,
                 url: str | None = None) -> TeacherClient:
  """The client of config.teacher.server, connected and checked against the run: the served
  model's fingerprint must be the local checkpoint's (local_fingerprint) and
  config.teacher.fingerprint when set, and its tokenizer the run's (config.tokenizer; with
  config.teacher.tokenizer, the rows hook checks that one); refused naming both.
  url: a server of config.teachers.more instead (its only model, its tokenizer checked)."""
  t = config.teacher
  client = TeacherClient(url or t.server, model='' if url else t.server_model,
                         options=ClientOptions(**t.client.to_dict()))
  served = client.connect()
  where = f'teacher server {client.url} (model {served.name!r})'
  expected_fingerprints = () if url else ((local_fingerprint, 'config.teacher.checkpoint'),
                                          (t.fingerprint, 'config.teacher.fingerprint'))
  for expected, source in expected_fingerprints:
    if expected and served.fingerprint is None:
      raise TeacherServerError(f'{where} reports no model fingerprint, so it cannot be checked '
                               f'against {source} ({expected}): refused')
    if expected and served.fingerprint != expected:
      raise TeacherServerError(f'{where} serves model fingerprint {served.fingerprint}, but '
                               f'{source} is {expected}: refused')
  # A teacher with its own tokenizer (config.teacher.tokenizer, cross-tokenizer methods only)
  # is checked against that one by its rows hook (distill.algorithms.served).
  if not t.tokenizer:
    check_tokenizer(client, tokenizer, 'config.tokenizer')
  if served.fingerprint is None:
    print(f'warning: {where} reports no fingerprints (not distill.serve): its model and '
          'tokenizer are not checked against this run', flush=True)
  return client
