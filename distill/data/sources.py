"""Real datasets as tasks: JSONL and Parquet files, and TFDS datasets (ArrayRecord, no TensorFlow).

Every source implements the task interface the grain pipeline consumes unchanged: `name`,
`splits`, `num_examples(split)`, `example(split, index) -> (prompt, completion)`. A row is either
plain (`prompt_field` and `completion_field` hold strings) or a chat (`messages_field` holds a
list of {'role', 'content'} turns, rendered with a chat template; the completion is the final
assistant turn, see distill.data.hf_tokenizer.ChatTemplate.split). `enable_thinking` (True /
False; None: the template's default) renders every chat row in that thinking mode (Qwen3's
switch), for teacher and student alike: both read the same row; templates without the switch
are refused.

Files are validated in full when the source is built, so a bad row fails before any compilation
(on_error='raise', the error names file and line) or is skipped and counted (on_error='skip').
Only the location of each valid row is kept; rows are re-read on access. A train/eval split of a
single file is a seeded choice of `eval_fraction` of the valid rows, independent of everything
but the file contents and `split_seed`. TFDS datasets are read lazily through
`tfds.data_source`, with their own splits.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from collections.abc import Mapping

import numpy as np

from distill.data.hf_tokenizer import ChatTemplate, ChatTemplateError, HFTokenizer

ON_ERROR = ('raise', 'skip')


class RowError(ValueError):
  """A row that cannot become an example (bad JSON, missing or ill-typed field, chat error)."""


def _to_py(value):
  """Decodes TFDS/Arrow values (bytes, numpy arrays) into str / list / dict."""
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if isinstance(value, np.ndarray):
    return [_to_py(v) for v in value.tolist()]
  if isinstance(value, (list, tuple)):
    return [_to_py(v) for v in value]
  if isinstance(value, Mapping):
    return {k: _to_py(v) for k, v in value.items()}
  return value


def resolve_chat_template(chat_template, enable_thinking: bool | None = None
                          ) -> ChatTemplate | None:
  """A ChatTemplate from a ChatTemplate, an HFTokenizer or a HF tokenizer folder (or None),
  splitting every row in thinking mode `enable_thinking` (None: the template's own default; a
  mode is refused for a template without one)."""
  template = _resolve_chat_template(chat_template)
  if enable_thinking is None:
    return template
  if template is None:
    raise ValueError(f'enable_thinking={enable_thinking!r} needs a chat template: set '
                     'messages_field and chat_template')
  try:
    return template.with_thinking(enable_thinking)
  except ValueError as e:
    raise ValueError(f'enable_thinking={enable_thinking!r}: {e}') from None


def _resolve_chat_template(chat_template) -> ChatTemplate | None:
  if chat_template is None or isinstance(chat_template, ChatTemplate):
    return chat_template
  tokenizer = chat_template if isinstance(chat_template, HFTokenizer) else None
  if tokenizer is None and isinstance(chat_template, str) and os.path.isdir(chat_template):
    tokenizer = HFTokenizer(chat_template)
  if tokenizer is None:
    raise ValueError('chat_template must be a ChatTemplate, an HFTokenizer or a tokenizer '
                     f'folder, got {chat_template!r}')
  if tokenizer.chat_template is None:
    raise ValueError(f'the tokenizer in {tokenizer.folder!r} has no chat template')
  return tokenizer.chat_template


@dataclasses.dataclass(frozen=True)
class RowFormat:
  """How a row (a mapping) becomes (prompt, completion)."""
  prompt_field: str = 'prompt'
  completion_field: str = 'completion'
  messages_field: str | None = None
  chat_template: ChatTemplate | None = None
  route_field: str | None = None   # a string naming the row's teacher (config.teachers.routes)

  def __post_init__(self):
    if self.messages_field and self.chat_template is None:
      raise ValueError(f'messages_field={self.messages_field!r} needs a chat_template')

  @property
  def fields(self) -> tuple[str, ...]:
    text = ((self.messages_field,) if self.messages_field else (self.prompt_field,
                                                                self.completion_field))
    return text + ((self.route_field,) if self.route_field else ())

  def route(self, row, where: str) -> str:
    value = _to_py(row[self.route_field])
    if not isinstance(value, str):
      raise RowError(f'{where}: field {self.route_field!r} (the row\'s teacher route) must be '
                     f'a string, got {type(value).__name__}')
    return value

  def example(self, row, where: str) -> tuple[str, str]:
    if not isinstance(row, Mapping):
      raise RowError(f'{where}: expected an object with fields {list(self.fields)}, got '
                     f'{type(row).__name__}')
    missing = [f for f in self.fields if f not in row]
    if missing:
      raise RowError(f'{where}: missing field(s) {missing} (row has {sorted(row)})')
    if self.messages_field:
      messages = _to_py(row[self.messages_field])
      if isinstance(messages, dict):   # TFDS Sequence of dicts: a dict of lists
        messages = [dict(zip(messages, turn)) for turn in zip(*messages.values())]
      try:
        return self.chat_template.split(messages, row=where)
      except ChatTemplateError as e:
        raise RowError(str(e)) from None
    prompt, completion = _to_py(row[self.prompt_field]), _to_py(row[self.completion_field])
    for field, value in ((self.prompt_field, prompt), (self.completion_field, completion)):
      if not isinstance(value, str):
        raise RowError(f'{where}: field {field!r} must be a string, got {type(value).__name__}')
    return prompt, completion


def _expand(paths) -> list[str]:
  out = []
  for pattern in [paths] if isinstance(paths, (str, os.PathLike)) else list(paths):
    matches = sorted(glob.glob(os.fspath(pattern)))
    if not matches:
      raise FileNotFoundError(f'no data file matches {os.fspath(pattern)!r}')
    out.extend(matches)
  return out


class _FileSource:
  """Shared by JSONL and Parquet: scan + validate files, split, fetch rows by location.

  Subclasses define `_scan(path) -> iterator of (location, where, row or RowError)` and
  `_fetch(path, location) -> row`.
  """
  kind = ''

  def __init__(self, path, *, prompt_field='prompt', completion_field='completion',
               messages_field=None, chat_template=None, on_error='raise', eval_fraction=0.0,
               eval_path=None, split_seed=0, name=None, route_field=None,
               enable_thinking=None):
    if on_error not in ON_ERROR:
      raise ValueError(f'on_error must be one of {ON_ERROR}, got {on_error!r}')
    if not 0.0 <= eval_fraction < 1.0:
      raise ValueError(f'eval_fraction must be in [0, 1), got {eval_fraction!r}')
    if eval_fraction and eval_path is not None:
      raise ValueError('give either eval_fraction or eval_path, not both')
    self.format = RowFormat(prompt_field, completion_field, messages_field,
                            resolve_chat_template(chat_template, enable_thinking), route_field)
    self.route_values: set[str] = set()   # every value of route_field in the files
    self.on_error = on_error
    self.num_skipped, self.skipped_examples = 0, []
    train_files = _expand(path)
    self._paths = train_files + (_expand(eval_path) if eval_path is not None else [])
    n_train_files = len(train_files)
    train = self._load(range(n_train_files))
    self.name = name or f'{self.kind}:{os.path.basename(self._paths[0])}'
    if eval_path is not None:
      self._refs = {'train': train, 'eval': self._load(range(n_train_files, len(self._paths)))}
    elif eval_fraction:
      n_eval = max(1, round(len(train) * eval_fraction))
      if n_eval >= len(train):
        raise ValueError(f'{self.name}: {len(train)} examples are too few for eval_fraction='
                         f'{eval_fraction} (nothing would be left to train on)')
      is_eval = np.zeros(len(train), bool)
      is_eval[np.random.default_rng(split_seed).permutation(len(train))[:n_eval]] = True
      self._refs = {'train': train[~is_eval], 'eval': train[is_eval]}
    else:
      self._refs = {'train': train}
    self.splits = tuple(self._refs)
    if self.num_skipped:
      logging.warning('%s: skipped %d bad row(s); first: %s', self.name, self.num_skipped,
                      self.skipped_examples[0])

  def _load(self, file_indices) -> np.ndarray:
    """[N, 2] int64 (file index, location) of the valid rows of these files."""
    refs, skipped_before = [], self.num_skipped
    for i in file_indices:
      for location, where, row in self._scan(self._paths[i]):
        try:
          if isinstance(row, RowError):
            raise row
          self.format.example(row, where)
          if self.format.route_field:
            self.route_values.add(self.format.route(row, where))
        except RowError as e:
          if self.on_error == 'raise':
            raise
          self.num_skipped += 1
          if len(self.skipped_examples) < 5:
            self.skipped_examples.append(str(e))
          continue
        refs.append((i, location))
    if not refs:
      files = ', '.join(self._paths[i] for i in file_indices)
      skipped = self.num_skipped - skipped_before
      raise ValueError(f'no examples in {files}' + (f' ({skipped} bad rows skipped)'
                                                    if skipped else ''))
    return np.asarray(refs, np.int64)

  def num_examples(self, split: str) -> int:
    return len(self._refs[self._check_split(split)])

  def example(self, split: str, index: int) -> tuple[str, str]:
    file_index, location = self._refs[self._check_split(split)][index]
    return self.format.example(self._fetch(self._paths[file_index], int(location)),
                               self.where(index, split))

  def route(self, split: str, index: int) -> str:
    """The route_field value of example `index` of `split` (the name of its teacher)."""
    if not self.format.route_field:
      raise ValueError(f'{self.name} has no route field: set task.kwargs.route_field')
    file_index, location = self._refs[self._check_split(split)][index]
    return self.format.route(self._fetch(self._paths[file_index], int(location)),
                             self.where(index, split))

  def where(self, index: int, split: str = 'train') -> str:
    """The file and line (JSONL) or row (Parquet) of example `index` of `split`."""
    file_index, location = self._refs[self._check_split(split)][index]
    return self._where(self._paths[file_index], int(location))

  def _check_split(self, split):
    if split not in self._refs:
      raise ValueError(f'{self.name} has no split {split!r}; valid: {self.splits}')
    return split

  def __repr__(self):
    sizes = ', '.join(f'{s}={len(r)}' for s, r in self._refs.items())
    return f'{type(self).__name__}({self.name!r}, {sizes}, skipped={self.num_skipped})'


class JsonlSource(_FileSource):
  """One JSON object per line. `path` (and `eval_path`): a file, a glob or a list of them."""
  kind = 'jsonl'

  def _scan(self, path):
    offset = 0
    with open(path, 'rb') as f:
      for lineno, line in enumerate(f, 1):
        start, offset = offset, offset + len(line)
        if not line.strip():
          continue
        where = f'{path}:{lineno}'
        try:
          yield start, where, json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
          yield start, where, RowError(f'{where}: invalid JSON ({e})')

  def _fetch(self, path, offset):
    with open(path, 'rb') as f:
      f.seek(offset)
      return json.loads(f.readline())

  def _where(self, path, offset):
    with open(path, 'rb') as f:   # only on the way to an error message: the line is counted
      line = f.read(offset).count(b'\n') + 1
    return f'{path}:{line}'


class ParquetSource(_FileSource):
  """Parquet files read with pyarrow (only the needed columns are kept in memory)."""
  kind = 'parquet'

  def __init__(self, path, **kwargs):
    self._tables = {}
    super().__init__(path, **kwargs)

  def _table(self, path):
    if path not in self._tables:
      import pyarrow as pa
      import pyarrow.parquet as pq
      try:
        schema = pq.read_schema(path)
      except (pa.ArrowException, OSError) as e:
        raise ValueError(f'cannot read parquet file {path!r}: {e}') from None
      missing = [f for f in self.format.fields if f not in schema.names]
      if missing:
        raise ValueError(f'{path}: missing column(s) {missing} (columns: {schema.names})')
      self._tables[path] = pq.read_table(path, columns=list(self.format.fields))
    return self._tables[path]

  def _scan(self, path):
    row = 0
    for batch in self._table(path).to_batches(max_chunksize=4096):
      for values in batch.to_pylist():
        yield row, f'{path} row {row}', values
        row += 1

  def _fetch(self, path, row):
    return self._table(path).slice(row, 1).to_pylist()[0]

  def _where(self, path, row):
    return f'{path} row {row}'


class TfdsSource:
  """A prepared TFDS dataset in ArrayRecord format, read with `tfds.data_source`.

  train_split / eval_split name the TFDS splits behind 'train' / 'eval'; eval_split='auto' takes
  'validation' or else 'test' when the dataset has one. Rows are converted on access; the first
  row of each split is checked when the source is built.
  """

  def __init__(self, name: str, data_dir: str | None = None, *, train_split='train',
               eval_split='auto', prompt_field='prompt', completion_field='completion',
               messages_field=None, chat_template=None, enable_thinking=None):
    import tensorflow_datasets as tfds
    self.name = f'tfds:{name}'
    self.format = RowFormat(prompt_field, completion_field, messages_field,
                            resolve_chat_template(chat_template, enable_thinking))
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise ValueError(f'TFDS dataset {name!r} not found in data_dir={data_dir!r}') from None
    available = list(builder.info.splits)
    if eval_split == 'auto':
      eval_split = next((s for s in ('validation', 'test') if s in available), None)
    wanted = {'train': train_split, **({'eval': eval_split} if eval_split else {})}
    for split, tfds_split in wanted.items():
      if tfds_split not in available:
        raise ValueError(f'{self.name}: no split {tfds_split!r} for {split!r} (prepared splits: '
                         f'{available}; nothing can be downloaded, prepare it first)')
    features = list(builder.info.features)
    missing = [f for f in self.format.fields if f not in features]
    if missing:
      raise ValueError(f'{self.name}: missing feature(s) {missing} (features: {features})')
    try:
      self._sources = {split: tfds.data_source(name, data_dir=data_dir, split=s, download=False)
                       for split, s in wanted.items()}
    except Exception as e:   # tfds raises various types for non-ArrayRecord or missing files
      raise ValueError(f'{self.name}: cannot open with tfds.data_source (it needs the '
                       f"ArrayRecord format, file_format='array_record'): {e}") from None
    self.splits = tuple(self._sources)
    for split in self.splits:
      if not len(self._sources[split]):
        raise ValueError(f'{self.name}: split {wanted[split]!r} is empty')
      self.example(split, 0)

  def num_examples(self, split: str) -> int:
    return len(self._source(split))

  def example(self, split: str, index: int) -> tuple[str, str]:
    return self.format.example(self._source(split)[index], f'{self.name} {split} record {index}')

  def _source(self, split):
    if split not in self._sources:
      raise ValueError(f'{self.name} has no split {split!r}; valid: {self.splits}')
    return self._sources[split]

  def __repr__(self):
    sizes = ', '.join(f'{s}={len(d)}' for s, d in self._sources.items())
    return f'TfdsSource({self.name!r}, {sizes})'


SOURCES = {'jsonl': JsonlSource, 'parquet': ParquetSource, 'tfds': TfdsSource}


def get_source(name: str, *args, **kwargs):
  """Builds source `name` ('jsonl', 'parquet', 'tfds') with the given arguments."""
  if name not in SOURCES:
    raise ValueError(f'unknown data source {name!r}; valid: {", ".join(SOURCES)}')
  return SOURCES[name](*args, **kwargs)
