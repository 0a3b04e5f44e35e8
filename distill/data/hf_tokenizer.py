"""Hugging Face tokenizers (tokenizer.json) and chat templates behind the CharTokenizer interface.

`HFTokenizer(folder)` reads tokenizer.json with the `tokenizers` library (no transformers), the
special tokens from tokenizer_config.json (falling back to the model's config.json ids), and the
chat template from chat_template.jinja or tokenizer_config.json. Templates render in a sandboxed
jinja2 environment set up as transformers does (trim_blocks, lstrip_blocks, `raise_exception`,
`tojson`, `strftime_now`), so renderings match `apply_chat_template`.

Special tokens, as the batch pipeline uses them: it adds BOS before every prompt and EOS after
every completion itself, so `encode` never adds special tokens, and `ChatTemplate.split` drops a
BOS the template renders at the start and the EOS (plus trailing whitespace) at the end.

Thinking mode (Qwen3's `enable_thinking`): a template that reads the switch renders the final
assistant turn's reasoning (its `reasoning_content`, or a leading <think>...</think> in its
content) before the answer, and its generation prompt opens with an empty think block when
thinking is off. `split(..., enable_thinking=False)` drops the final turn's reasoning, so the
completion is the answer alone; with True the completion is reasoning then answer.
`split_thinking` gives a teacher's and a student's views of one conversation, each in its own
mode (teacher thinking and student not, or the reverse), and checks both completions end with
the same answer, the part the two can be compared on.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer

from distill.data.tokenizer import content_ids

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'chat_template.jinja')


class ChatTemplateError(ValueError):
  """A conversation the chat template cannot turn into (prompt, completion)."""


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


_THINKING_SWITCH = 'enable_thinking'


class ThinkingViews(NamedTuple):
  """One conversation as a teacher and a student see it, each in its own thinking mode."""
  teacher: tuple[str, str]      # (prompt, completion)
  student: tuple[str, str]
  answer: str                   # what both completions end with: the final turn's answer


def _without_reasoning(message: dict) -> dict:
  """The message with no reasoning: no reasoning_content, and its content after the last
  </think> (leading newlines dropped) when it writes its reasoning inline."""
  content = message['content']
  if '</think>' in content:
    content = content.rsplit('</think>', 1)[1].lstrip('\n')
  return {**{k: v for k, v in message.items() if k != 'reasoning_content'}, 'content': content}


class ChatTemplate:
  """A compiled jinja chat template plus the special tokens it may reference.

  enable_thinking: the thinking mode `split` uses when not told (None: the template's default,
  the switch not passed); only for templates that read the `enable_thinking` switch.
  """

  def __init__(self, source: str, special_tokens: dict[str, str | None] | None = None,
               enable_thinking: bool | None = None):
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters['tojson'] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    try:
      self._template = env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
      raise ValueError(f'chat template does not compile: {e} (line {e.lineno})') from None
    self.source = source
    self.special_tokens = dict(special_tokens or {})
    self._check_thinking(enable_thinking)
    self.enable_thinking = enable_thinking

  def __reduce__(self):   # compiled templates do not pickle; grain workers may need to
    return ChatTemplate, (self.source, self.special_tokens, self.enable_thinking)

  @property
  def has_thinking_switch(self) -> bool:
    return _THINKING_SWITCH in self.source

  def _check_thinking(self, enable_thinking):
    if enable_thinking is not None and not isinstance(enable_thinking, bool):
      raise ValueError(f'enable_thinking must be True, False or None, got {enable_thinking!r}')
    if enable_thinking is not None and not self.has_thinking_switch:
      raise ValueError(f'this chat template has no thinking mode: it never reads '
                       f'{_THINKING_SWITCH!r} (Qwen3-style templates do)')

  def with_thinking(self, enable_thinking: bool | None) -> ChatTemplate:
    """The same template, splitting in thinking mode `enable_thinking` by default."""
    return ChatTemplate(self.source, self.special_tokens, enable_thinking)

  def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = False,
             row: str = 'conversation', **kwargs) -> str:
    """The template applied to `messages`; ChatTemplateError naming `row` if it fails."""
    try:
      return self._template.render(messages=list(messages),
                                   add_generation_prompt=add_generation_prompt,
                                   **self.special_tokens, **kwargs)
    except Exception as e:   # the template is user code: any failure is this row's error
      raise ChatTemplateError(f'{row}: chat template failed to render: '
                              f'{type(e).__name__}: {e}') from None

  def split(self, messages: Sequence[dict], *, row: str = 'conversation',
            enable_thinking: bool | None = None) -> tuple[str, str]:
    """(prompt, completion): the completion is the final assistant turn, the prompt everything
    before it rendered with the generation prompt.

    enable_thinking (None: self.enable_thinking): passed to the template; False also drops the
    final turn's reasoning, so the completion is its answer alone.
    """
    thinking = self.enable_thinking if enable_thinking is None else enable_thinking
    self._check_thinking(thinking)
    if not messages or not isinstance(messages, (list, tuple)):
      raise ChatTemplateError(f'{row}: messages must be a non-empty list, got {messages!r}')
    for m in messages:
      if not isinstance(m, dict) or not isinstance(m.get('role'), str) or \
          not isinstance(m.get('content'), str):
        raise ChatTemplateError(f'{row}: every message needs string "role" and "content", '
                                f'got {m!r}')
    if messages[-1]['role'] != 'assistant':
      raise ChatTemplateError(f'{row}: the last message must be the assistant turn to learn, '
                              f'got role {messages[-1]["role"]!r}')
    switch = {} if thinking is None else {_THINKING_SWITCH: thinking}
    if thinking is False:
      messages = [*messages[:-1], _without_reasoning(messages[-1])]
    full = self.render(messages, row=row, **switch)
    prompt = self.render(messages[:-1], add_generation_prompt=True, row=row, **switch)
    if not full.startswith(prompt):
      raise ChatTemplateError(f'{row}: the template renders the conversation without its last '
                              'turn as something other than a prefix of the whole, so the '
                              'prompt/completion split is ambiguous')
    completion = full[len(prompt):]
    bos, eos = self.special_tokens.get('bos_token'), self.special_tokens.get('eos_token')
    if bos and prompt.startswith(bos):
      prompt = prompt[len(bos):]
    stripped = completion.rstrip()
    if eos and stripped.endswith(eos):
      completion = stripped[:-len(eos)]
    return prompt, completion

  def split_thinking(self, messages: Sequence[dict], *, teacher_thinking: bool,
                     student_thinking: bool, row: str = 'conversation') -> ThinkingViews:
    """The teacher's and the student's (prompt, completion), each split in its own thinking
    mode; ChatTemplateError naming `row` when a completion does not end with the answer (the
    final turn rendered without thinking), which both views must share to be compared."""
    answer = self.split(messages, row=row, enable_thinking=False)[1]
    views = {}
    for side, thinking in (('teacher', teacher_thinking), ('student', student_thinking)):
      views[side] = self.split(messages, row=row, enable_thinking=thinking)
      if not views[side][1].endswith(answer):
        raise ChatTemplateError(
            f'{row}: the {side}\'s completion (thinking {"on" if thinking else "off"}) does not '
            f'end with the answer {answer!r} the template renders without thinking, so the '
            'teacher and student views cannot be aligned on it')
    return ThinkingViews(views['teacher'], views['student'], answer)


def _token_content(value):
  """tokenizer_config.json writes special tokens as strings or AddedToken dicts."""
  return value.get('content') if isinstance(value, dict) else value


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


class HFTokenizer:
  """tokenizer.json behind the CharTokenizer interface (vocab_size, pad/bos/eos ids, encode,
  decode, fingerprint), plus `chat_template` (a ChatTemplate or None)."""

  def __init__(self, folder: str):
    path = os.path.join(folder, 'tokenizer.json')
    if not os.path.isfile(path):
      raise FileNotFoundError(f'no tokenizer.json in {folder!r}')
    self.folder = folder
    self.tokenizer = Tokenizer.from_file(path)
    self.config = _read_json(os.path.join(folder, 'tokenizer_config.json'))
    model_config = _read_json(os.path.join(folder, 'config.json'))
    self.files = tuple(n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, n)))
    vocab = self.tokenizer.get_vocab(with_added_tokens=True)
    self._vocab_size = max(vocab.values()) + 1

    def special(name):
      """Id of special token `name`: tokenizer_config.json first, then config.json."""
      token = _token_content(self.config.get(f'{name}_token'))
      if token is not None:
        if token not in vocab:
          raise ValueError(f'{folder}: tokenizer_config.json {name}_token={token!r} is not in '
                           'the vocabulary')
        return vocab[token]
      ids = model_config.get(f'{name}_token_id')
      return ids[0] if isinstance(ids, list) and ids else ids

    self.eos_id = special('eos')
    if self.eos_id is None:
      raise ValueError(f'{folder}: no eos_token in tokenizer_config.json and no eos_token_id in '
                       'config.json; the pipeline needs one to end completions')
    # No BOS (Qwen) or pad (Llama 3) of their own: reuse EOS, the GPT-2 convention.
    bos, pad = special('bos'), special('pad')
    self.bos_id = self.eos_id if bos is None else bos
    self.pad_id = self.eos_id if pad is None else pad
    # Whether the model was trained with a BOS: its own post-processor or config adds one.
    self.add_bos = bool(self.config.get('add_bos_token', False)) or (
        self.tokenizer.encode('a', add_special_tokens=True).ids[:1] == [self.bos_id])
    self.chat_template = self._chat_template(folder)

  def _chat_template(self, folder: str) -> ChatTemplate | None:
    jinja_path = os.path.join(folder, 'chat_template.jinja')
    source = self.config.get('chat_template')
    if os.path.isfile(jinja_path):
      with open(jinja_path) as f:
        source = f.read()
    if isinstance(source, list):   # named templates: [{'name': 'default', 'template': ...}, ...]
      source = {t.get('name'): t.get('template') for t in source}.get('default')
    if not source:
      return None
    # As in transformers, only the tokens tokenizer_config.json defines reach the template.
    specials = {f'{n}_token': _token_content(self.config.get(f'{n}_token'))
                for n in ('bos', 'eos', 'pad', 'unk')}
    return ChatTemplate(source, {k: v for k, v in specials.items() if v is not None})

  @property
  def vocab_size(self) -> int:
    """One past the largest token id (a model's vocabulary may be padded beyond it)."""
    return self._vocab_size

  def token_id(self, token: str) -> int:
    tid = self.tokenizer.token_to_id(token)
    if tid is None:
      raise ValueError(f'token {token!r} is not in the vocabulary of {self.folder}')
    return tid

  def encode(self, text: str) -> list[int]:
    """Ids of `text`; special tokens written in the text (e.g. '<|im_start|>') map to their ids,
    but none are added (the pipeline adds BOS/EOS)."""
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`: stops at the first EOS, skips pad and BOS, keeps other special tokens."""
    return self.tokenizer.decode(content_ids(self, ids), skip_special_tokens=False)

  def fingerprint(self) -> str:
    """Stable short hash of the vocabulary, merges, normalisation and special ids."""
    blob = json.dumps([json.loads(self.tokenizer.to_str()), self.pad_id, self.bos_id,
                       self.eos_id], sort_keys=True).encode()
    return 'hf-' + hashlib.sha256(blob).hexdigest()[:16]

  def __repr__(self) -> str:
    return (f'HFTokenizer({self.folder!r}, vocab_size={self.vocab_size}, '
            f'fingerprint={self.fingerprint()!r})')
