"""Text spans two tokenizers agree on, for distillation from a teacher with its own tokenizer.

Both tokenizers encode the same completion text. A *boundary* of a tokenization is a character
offset at which one of its tokens ends (the decoded prefix of its first k tokens is exactly the
text's first characters); the boundaries both tokenizations have cut the text into *spans*,
each the text of a whole number of tokens on either side:

    text     '12+34'
    student  '1' '2' '+' '3' '4'     boundaries {1, 2, 3, 4, 5}
    teacher  '12' '+3' '4'           boundaries {2, 4, 5}
    spans    '12' | '+3' | '4'       student tokens per span 2, 2, 1; teacher 1, 1, 1

The end-of-sequence token that follows every completion is one more span of its own. Both
models condition on exactly the same text at the start of a span, which is what the
cross-tokenizer losses (distill.losses.cross_tokenizer) rely on.

`target_spans` gives, per token of one tokenization, the span it belongs to; `shared_vocabulary`
pairs the ids of tokens whose text is the same in both vocabularies.
"""
from __future__ import annotations

import numpy as np


def boundaries(tokenizer, ids: list[int], text: str, *, side: str = 'tokenizer') -> dict:
  """{character offset: number of tokens} for every offset a prefix of `ids` decodes up to.

  Decoding prefixes (not per-token strings) handles every decoder the same way: byte-level
  pieces of one character, word-piece continuations, a metaspace's dropped leading space. A
  prefix that does not decode to a prefix of `text` (half a UTF-8 character) is no boundary.
  """
  if tokenizer.decode(ids) != text:
    raise ValueError(f'the {side} does not decode its own tokens of {text!r} back to the text '
                     f'(got {tokenizer.decode(ids)!r}); text spans cannot be aligned with it')
  found = {0: 0}
  for k in range(1, len(ids) + 1):
    piece = tokenizer.decode(ids[:k])
    if text.startswith(piece):
      found.setdefault(len(piece), k)
  return found


def target_spans(student, teacher, student_ids: list[int], teacher_ids: list[int],
                 text: str) -> tuple[np.ndarray, np.ndarray, int]:
  """(student_span_N+1, teacher_span_M+1, number of spans with the EOS span).

  Entry i is the span of token i of each tokenization of `text`; the last entry, the EOS
  that ends the completion, is its own final span.
  """
  own = boundaries(student, student_ids, text, side='student tokenizer')
  other = boundaries(teacher, teacher_ids, text, side='teacher tokenizer')
  shared = sorted(set(own) & set(other) - {0})   # len(text) is always shared

  def spans(ends: dict, n_tokens: int) -> np.ndarray:
    span = np.zeros(n_tokens + 1, np.int32)
    first = 0
    for index, offset in enumerate(shared):
      span[first:ends[offset]] = index
      first = ends[offset]
    span[n_tokens] = len(shared)
    return span

  return spans(own, len(student_ids)), spans(other, len(teacher_ids)), len(shared) + 1


def span_row(spans: np.ndarray, loss_mask_T: np.ndarray) -> np.ndarray:
  """[T] span ids at the target columns of a row (its loss mask's columns, in order), −1 else."""
  columns = np.flatnonzero(loss_mask_T)
  if len(columns) != len(spans):
    raise ValueError(f'{len(spans)} span ids for {len(columns)} target columns')
  row = np.full(loss_mask_T.shape, -1, np.int32)
  row[columns] = spans
  return row


def token_texts(tokenizer) -> dict[str, int]:
  """{text: id} of the tokens that decode alone to a text no other token decodes to.

  EOS maps under the key '<eos>' (every tokenizer's end of sequence is the same event); pad
  and BOS never appear as targets and are left out.
  """
  seen: dict[str, list[int]] = {}
  for i in range(tokenizer.vocab_size):
    if i in (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id):
      continue
    text = tokenizer.decode([i])
    if text:
      seen.setdefault(text, []).append(i)
  texts = {text: ids[0] for text, ids in seen.items() if len(ids) == 1}
  texts['<eos>'] = tokenizer.eos_id
  return texts


def shared_vocabulary(student, teacher) -> tuple[np.ndarray, np.ndarray]:
  """(student_ids_K, teacher_ids_K): the tokens with one text in both vocabularies, paired."""
  own, other = token_texts(student), token_texts(teacher)
  common = sorted(set(own) & set(other))
  return (np.asarray([own[t] for t in common], np.int32),
          np.asarray([other[t] for t in common], np.int32))
