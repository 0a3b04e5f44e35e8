"""grain pipelines that turn a task's (prompt, completion) examples into fixed-shape batches.

Row layout, T = prompt_len + completion_len (P = prompt_len, c = completion chars):

    column    0 .. P-1                      | P .. P+C-1
    tokens    pad.. pad BOS prompt chars    | completion chars EOS pad .. pad
    targets   tokens shifted left by one (last column = pad)
    loss_mask 1.0 at columns P-1 .. P+c-1, i.e. where the target is a completion
              char or the EOS; prompt and padding never count

Prompts are left-padded so every prompt ends at column P-1 and generation starts at
column P for the whole batch. Batches are dicts of numpy arrays: tokens/targets/
input_mask int32 [B,T], loss_mask float32 [B,T]. `batch_size` is per process.
"""
import grain
import numpy as np

from distill.data import cross_tokenizer
from distill.data.tokenizer import CharTokenizer

Example = dict[str, np.ndarray]
# Several teachers routed per row: int32 [T], the index of the row's teacher (constant in T).
ROUTE_FIELD = 'teacher_route'


def example_name(task, split: str, index: int) -> str:
  """Where an example comes from, for errors: file and line for file sources."""
  if hasattr(task, 'where'):
    return task.where(index, split)
  return f'{task.name} {split} example {index}'


def encode_example(tokenizer: CharTokenizer, prompt: str, completion: str, *,
                   prompt_len: int, completion_len: int, name: str = 'example') -> Example:
  """One row of the batch layout above; ValueError (naming `name`) if it does not fit."""
  # HF tokenizers of models trained without BOS (e.g. Qwen) say so with add_bos=False.
  bos = [tokenizer.bos_id] if getattr(tokenizer, 'add_bos', True) else []
  try:
    p_ids, c_ids = bos + tokenizer.encode(prompt), tokenizer.encode(completion)
  except ValueError as e:   # e.g. a character the CharTokenizer lacks
    raise ValueError(f'{name}: {e}') from None
  if not p_ids:
    raise ValueError(f'{name}: empty prompt and a tokenizer without BOS: nothing predicts '
                     'the first completion token')
  if len(p_ids) > prompt_len:
    raise ValueError(f'{name}: prompt {prompt!r} needs {len(p_ids)} tokens (with BOS if any) '
                     f'but prompt_len={prompt_len}')
  if len(c_ids) + 1 > completion_len:
    raise ValueError(f'{name}: completion {completion!r} needs {len(c_ids) + 1} tokens '
                     f'(with EOS) but completion_len={completion_len}')
  n_left = prompt_len - len(p_ids)
  n_right = completion_len - 1 - len(c_ids)
  pad = tokenizer.pad_id
  tokens = [pad] * n_left + p_ids + c_ids + [tokenizer.eos_id] + [pad] * n_right
  tokens_T = np.asarray(tokens, np.int32)
  input_mask_T = np.zeros_like(tokens_T)
  input_mask_T[n_left:len(tokens) - n_right] = 1
  loss_mask_T = np.zeros(len(tokens), np.float32)
  loss_mask_T[prompt_len - 1:prompt_len + len(c_ids)] = 1.0
  return dict(tokens=tokens_T, targets=np.append(tokens_T[1:], np.int32(pad)),
              input_mask=input_mask_T, loss_mask=loss_mask_T)


def teacher_fields(student: Example, tokenizer, teacher_tokenizer, prompt: str,
                   completion: str, *, prompt_len: int, completion_len: int,
                   name: str = 'example') -> Example:
  """For a teacher with its own tokenizer, beside the student's row `student`: the row in the
  teacher's ids (same layout and lengths, fields prefixed 'teacher_') and the text spans both
  tokenizations share (distill.data.cross_tokenizer): 'span_ids' at the student's target
  columns, 'teacher_span_ids' at the teacher's, −1 elsewhere."""
  lengths = dict(prompt_len=prompt_len, completion_len=completion_len)
  teacher = encode_example(teacher_tokenizer, prompt, completion,
                           name=f'{name} (teacher tokenizer)', **lengths)
  try:
    student_spans, teacher_spans, _ = cross_tokenizer.target_spans(
        tokenizer, teacher_tokenizer, tokenizer.encode(completion),
        teacher_tokenizer.encode(completion), completion)
  except ValueError as e:
    raise ValueError(f'{name}: {e}') from None
  return {**{f'teacher_{k}': v for k, v in teacher.items()},
          'span_ids': cross_tokenizer.span_row(student_spans, student['loss_mask']),
          'teacher_span_ids': cross_tokenizer.span_row(teacher_spans, teacher['loss_mask'])}


def with_route(row: Example, route, split: str, index: int | None) -> Example:
  """row with ROUTE_FIELD from `route(split, index)` (0 for a padding row, index None);
  unchanged without a route."""
  if route is not None:
    row[ROUTE_FIELD] = np.full(row['tokens'].shape, 0 if index is None else route(split, index),
                               np.int32)
  return row


def padding_example(tokenizer: CharTokenizer, *, prompt_len: int, completion_len: int) -> Example:
  """A row that carries nothing: all pad, both masks zero (fills partial eval batches)."""
  tokens_T = np.full(prompt_len + completion_len, tokenizer.pad_id, np.int32)
  return dict(tokens=tokens_T, targets=tokens_T.copy(), input_mask=np.zeros_like(tokens_T),
              loss_mask=np.zeros(tokens_T.shape, np.float32))


def _check_args(task, split, prompt_len, completion_len, shard_index, shard_count):
  if split not in task.splits:
    raise ValueError(f'task {task.name!r} has no split {split!r}; valid: {task.splits}')
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}')
  # Fail at construction, not thousands of steps in, when the declared worst case
  # does not fit (per-example checks still guard tasks that declare nothing).
  for what, limit, declared, extra in (
      ('prompt_len', prompt_len, getattr(task, 'max_prompt_chars', None), 'BOS'),
      ('completion_len', completion_len, getattr(task, 'max_completion_chars', None), 'EOS')):
    if limit < 1:
      raise ValueError(f'{what} must be >= 1, got {limit}')
    if declared is not None and declared + 1 > limit:
      raise ValueError(f'{what}={limit} is too short for task {task!r}: its examples need up '
                       f'to {declared + 1} tokens ({declared} chars + {extra})')


def make_dataset(task, tokenizer: CharTokenizer, *, split: str, prompt_len: int,
                 completion_len: int, seed: int, shuffle: bool = True,
                 num_epochs: int | None = None, shard_index: int = 0,
                 shard_count: int = 1, teacher_tokenizer=None,
                 route=None) -> grain.MapDataset:
  """Encoded single examples of `split`; process `shard_index` sees every
  `shard_count`-th example. Shuffling is reseeded every epoch; num_epochs=None repeats
  forever. With a `teacher_tokenizer`, rows carry `teacher_fields` too; with a
  `route(split, index) -> teacher index`, ROUTE_FIELD."""
  _check_args(task, split, prompt_len, completion_len, shard_index, shard_count)
  ds = grain.MapDataset.range(task.num_examples(split))[shard_index::shard_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)

  def encode(index):
    prompt, completion = task.example(split, index)
    lengths = dict(prompt_len=prompt_len, completion_len=completion_len,
                   name=example_name(task, split, index))
    row = encode_example(tokenizer, prompt, completion, **lengths)
    if teacher_tokenizer is not None:
      row.update(teacher_fields(row, tokenizer, teacher_tokenizer, prompt, completion, **lengths))
    return with_route(row, route, split, index)

  return ds.map(encode)


def make_iterator(task, tokenizer: CharTokenizer, *, split: str, prompt_len: int,
                  completion_len: int, batch_size: int, seed: int, shuffle: bool = True,
                  num_epochs: int | None = None, shard_index: int = 0, shard_count: int = 1,
                  drop_remainder: bool = True) -> grain.DatasetIterator:
  """Iterator of batches; `get_state()`/`set_state()` checkpoint its position exactly."""
  ds = make_dataset(task, tokenizer, split=split, prompt_len=prompt_len,
                    completion_len=completion_len, seed=seed, shuffle=shuffle,
                    num_epochs=num_epochs, shard_index=shard_index, shard_count=shard_count)
  return iter(ds.batch(batch_size, drop_remainder=drop_remainder).to_iter_dataset())


def make_eval_iterator(task, tokenizer: CharTokenizer, *, prompt_len: int, completion_len: int,
                       batch_size: int, split: str = 'eval', shard_index: int = 0,
                       shard_count: int = 1, route=None) -> grain.DatasetIterator:
  """One unshuffled pass over `split`, every example exactly once across shards (with
  ROUTE_FIELD when a `route` is given, as make_dataset).

  The last batch is filled with padding rows (all-zero masks) rather than dropped, and
  every shard yields the same number of batches (shards that run out first emit
  padding-only batches), so multi-host evaluation steps stay in lockstep.
  """
  _check_args(task, split, prompt_len, completion_len, shard_index, shard_count)
  n = task.num_examples(split)
  per_shard = -(-n // shard_count)
  num_rows = -(-per_shard // batch_size) * batch_size
  pad_row = padding_example(tokenizer, prompt_len=prompt_len, completion_len=completion_len)

  def encode(slot):
    index = slot * shard_count + shard_index
    if index >= n:
      return with_route({k: v.copy() for k, v in pad_row.items()}, route, split, None)
    prompt, completion = task.example(split, index)
    return with_route(encode_example(tokenizer, prompt, completion, prompt_len=prompt_len,
                                     completion_len=completion_len,
                                     name=example_name(task, split, index)),
                      route, split, index)

  ds = grain.MapDataset.range(num_rows).map(encode)
  return iter(ds.batch(batch_size).to_iter_dataset())

