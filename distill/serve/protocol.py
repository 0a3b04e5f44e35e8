"""vLLM's OpenAI-compatible completions protocol: request fields in, response layout out.

Requests (POST /v1/completions): `prompt` as token ids (a list of ints, or a list of such
lists for a batch) or text; `max_tokens` (default 16; 0 with `echo` scores the prompt only),
`n`, `temperature`, `top_k` (0 or -1: off), `top_p`, `seed`; `logprobs` = k for the top-k of
each generated position, `prompt_logprobs` = k for every prompt position, `echo`,
`return_tokens_as_token_ids` ('token_id:N' strings instead of token text) and
`return_token_ids`. Fields that would change the output and are not implemented (stop
strings, penalties, streaming, ...) are refused by name rather than ignored.

Responses follow vLLM: `choices[i]` with `text`, `logprobs` ({tokens, token_logprobs,
top_logprobs, text_offset} or null), `prompt_logprobs` ([null, {id: {logprob, rank,
decoded_token}}, ...]: the top-k of each position plus the prompt's own token, keyed by the
id as a string), `finish_reason` ('stop' at EOS, else 'length'); `usage`; and
`system_fingerprint`, the served model's fingerprint, so a client notices a swapped model.
Errors: {"error": {"message", "type", "param", "code"}} with vLLM's messages where it has
them (e.g. "Requested prompt logprobs of 30, which is greater than max allowed: 20").
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import time
import uuid

import numpy as np

from distill.serve.engine import Engine

# Fields vLLM takes that would change the result, with the value that changes nothing.
NEUTRAL = {'stream': False, 'stop': None, 'stop_token_ids': None, 'presence_penalty': 0.0,
           'frequency_penalty': 0.0, 'repetition_penalty': 1.0, 'min_p': 0.0,
           'logit_bias': None, 'min_tokens': 0, 'suffix': None, 'ignore_eos': False}


class RequestError(ValueError):
  def __init__(self, message: str, param: str | None = None, code: int = 400,
               kind: str = 'BadRequestError'):
    super().__init__(message)
    self.param, self.code, self.kind = param, code, kind

  def body(self) -> dict:
    return {'error': {'message': str(self), 'type': self.kind, 'param': self.param,
                      'code': self.code}}


@dataclasses.dataclass(frozen=True)
class Completion:
  prompts: list[list[int]]
  max_tokens: int
  n: int
  temperature: float
  top_k: int
  top_p: float
  seed: int
  logprobs: int | None
  prompt_logprobs: int | None
  echo: bool
  tokens_as_ids: bool
  return_token_ids: bool


def _int(body, name, default, low):
  value = body.get(name, default)
  if value is None:
    value = default
  if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                            or value < low):
    raise RequestError(f'`{name}` must be an integer >= {low}, got {value!r}.', name)
  return value


def _real(body, name, default, low, high):
  value = body.get(name, default)
  value = default if value is None else value
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= value <= high:
    raise RequestError(f'`{name}` must be a number in [{low}, {high}], got {value!r}.', name)
  return float(value)


def _prompts(body, engine: Engine) -> list[list[int]]:
  prompt = body.get('prompt')
  if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and
                                 all(isinstance(p, numbers.Integral) for p in prompt)):
    prompt = [prompt]
  if not isinstance(prompt, list) or not prompt:
    raise RequestError('`prompt` must be token ids, a list of token-id lists, or text.', 'prompt')
  prompts = []
  for i, p in enumerate(prompt):
    ids = engine.tokenizer.encode(p) if isinstance(p, str) else p
    if not isinstance(ids, list) or not ids:
      raise RequestError(f'prompt {i} is empty or not a list of token ids.', 'prompt')
    for t in ids:
      if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < engine.model_config.vocab_size:
        raise RequestError(f'Token id {t!r} in prompt {i} is out of vocabulary '
                           f'(size {engine.model_config.vocab_size}).', 'prompt')
    prompts.append([int(t) for t in ids])
  return prompts


def parse_completion(body, engine: Engine, *, served_name: str, max_logprobs: int) -> Completion:
  if not isinstance(body, dict):
    raise RequestError('the request body must be a JSON object.')
  if body.get('model') not in (None, served_name):
    raise RequestError(f'The model `{body["model"]}` does not exist.', 'model', 404,
                       'NotFoundError')
  for name, neutral in NEUTRAL.items():
    if body.get(name, neutral) not in (neutral, [], {}):
      raise RequestError(f'`{name}` is not supported by distill.serve.', name)
  prompts = _prompts(body, engine)
  max_tokens = _int(body, 'max_tokens', 16, 0)
  echo = body.get('echo', False) is True
  logprobs = _int(body, 'logprobs', None, -1)
  prompt_logprobs = _int(body, 'prompt_logprobs', None, -1)
  if prompt_logprobs is None and echo:
    prompt_logprobs = logprobs
  vocab = engine.model_config.vocab_size
  for kind, name, value in (('sample', 'logprobs', logprobs),
                            ('prompt', 'prompt_logprobs', prompt_logprobs)):
    requested = vocab if value == -1 else value
    if requested is not None and requested > max_logprobs:
      raise RequestError(f'Requested {kind} logprobs of {requested}, which is greater than max '
                         f'allowed: {max_logprobs}', name)
  logprobs = vocab if logprobs == -1 else logprobs
  prompt_logprobs = vocab if prompt_logprobs == -1 else prompt_logprobs
  longest = max(len(p) for p in prompts)
  if longest + max_tokens > engine.max_model_len:
    raise RequestError(f"This model's maximum context length is {engine.max_model_len} tokens. "
                       f'However, you requested {longest + max_tokens} tokens ({longest} in the '
                       f'prompt, {max_tokens} in the completion). Please reduce the length of '
                       'the prompt or completion.', 'max_tokens')
  top_k = _int(body, 'top_k', 0, -1)
  seed = _int(body, 'seed', None, 0)
  return Completion(
      prompts=prompts, max_tokens=max_tokens, n=_int(body, 'n', 1, 1),
      temperature=_real(body, 'temperature', 1.0, 0.0, math.inf), top_k=max(top_k, 0),
      top_p=_real(body, 'top_p', 1.0, 1e-9, 1.0),
      seed=int.from_bytes(uuid.uuid4().bytes[:4], 'little') if seed is None else seed,
      logprobs=logprobs, prompt_logprobs=prompt_logprobs, echo=echo,
      tokens_as_ids=body.get('return_tokens_as_token_ids') is True,
      return_token_ids=body.get('return_token_ids') is True)


def complete(request: Completion, engine: Engine, *, served_name: str) -> dict:
  """Runs a parsed request on the engine and lays the result out as vLLM does."""
  tokenizer = engine.tokenizer
  prompts = [p for p in request.prompts for _ in range(request.n)]
  if request.max_tokens:
    completions = engine.generate(prompts, max_tokens=request.max_tokens,
                                  temperature=request.temperature, top_k=request.top_k,
                                  top_p=request.top_p, seed=request.seed)
  else:
    completions = [[] for _ in prompts]
  k = max(request.logprobs or 0, request.prompt_logprobs or 0, 1)
  scores = engine.score([p + c for p, c in zip(prompts, completions)], k)

  def token_str(i):
    return f'token_id:{i}' if request.tokens_as_ids else engine.token_text[i]

  def top_dict(row, m, ids, lps, token, token_lp, rank):
    """vLLM's top-m of one position plus the token that is there, {id: Logprob}."""
    entries = {int(ids[row, j]): (float(lps[row, j]), j + 1) for j in range(m)}
    entries.setdefault(int(token), (float(token_lp), int(rank)))
    return entries

  choices = []
  for index, (prompt, completion) in enumerate(zip(prompts, completions)):
    ids, lps = scores.topk_ids[index], scores.topk_logprobs[index]
    token_lps, ranks = scores.token_logprobs[index], scores.token_ranks[index]
    sequence = prompt + completion
    choice = {'index': index, 'text': (tokenizer.decode(prompt) if request.echo else '') +
              tokenizer.decode(completion),
              'logprobs': None,
              'finish_reason': ('stop' if completion and completion[-1] == tokenizer.eos_id
                                else 'length'),
              'stop_reason': None, 'prompt_logprobs': None}
    if request.prompt_logprobs is not None:
      choice['prompt_logprobs'] = [None] + [
          {str(t): {'logprob': lp, 'rank': r, 'decoded_token': engine.token_text[t]}
           for t, (lp, r) in top_dict(p - 1, request.prompt_logprobs, ids, lps, sequence[p],
                                      token_lps[p - 1], ranks[p - 1]).items()}
          for p in range(1, len(prompt))]
    if request.logprobs is not None:
      first = 0 if request.echo else len(prompt)
      positions = range(first, len(sequence))
      tokens = [token_str(sequence[p]) for p in positions]
      choice['logprobs'] = {
          'tokens': tokens,
          'token_logprobs': [None if p == 0 else float(token_lps[p - 1]) for p in positions],
          'top_logprobs': [None if p == 0 else
                           {token_str(t): lp for t, (lp, _) in top_dict(
                               p - 1, request.logprobs, ids, lps, sequence[p],
                               token_lps[p - 1], ranks[p - 1]).items()}
                           for p in positions],
          'text_offset': list(np.cumsum([0] + [len(t) for t in tokens[:-1]]).tolist())}
    if request.return_token_ids:
      choice['prompt_token_ids'], choice['token_ids'] = prompt, completion
    choices.append(choice)
  prompt_tokens = sum(len(p) for p in request.prompts)
  completion_tokens = sum(len(c) for c in completions)
  return {'id': f'cmpl-{uuid.uuid4().hex}', 'object': 'text_completion',
          'created': int(time.time()), 'model': served_name, 'choices': choices,
          'system_fingerprint': engine.fingerprint,
          'usage': {'prompt_tokens': prompt_tokens, 'completion_tokens': completion_tokens,
                    'total_tokens': prompt_tokens + completion_tokens}}


def model_list(engine: Engine, *, served_name: str, root: str, max_logprobs: int) -> dict:
  """GET /v1/models: vLLM's model card, plus what a distill client checks before training."""
  return {'object': 'list', 'data': [{
      'id': served_name, 'object': 'model', 'created': int(time.time()), 'owned_by': 'distill',
      'root': root, 'parent': None, 'max_model_len': engine.max_model_len, 'permission': [],
      'distill': {'model_fingerprint': engine.fingerprint,
                  'tokenizer_fingerprint': engine.tokenizer_fingerprint,
                  'vocab_size': engine.model_config.vocab_size, 'max_logprobs': max_logprobs,
                  'eos_id': engine.tokenizer.eos_id, 'pad_id': engine.tokenizer.pad_id}}]}
