"""Fuzz cases of what users hand the framework: config overrides, JSONL lines, Parquet rows.

Each kind is a hypothesis strategy and a check that runs one drawn case and says how it ended:
ACCEPTED (the run, its method and its train state's shapes were built and the state fits a
device, all the trainer does before compiling; or every example was read and encoded),
CLEAR_ERROR (a user error naming the config field, or the file and line / row) or UNBUILDABLE
(pyarrow cannot write the drawn rows: not an input a user could hand us). An error that names
none of these fails the check's assertion; any other exception propagates (a crash). Used by
tests/test_fuzz.py (a few examples, in the suite) and experiments/faults/fuzz.py (many, with
the outcomes counted).
"""
import json
import os
import tempfile

import jax
from hypothesis import strategies as st

from distill.data import sources
from distill.data.tokenizer import CharTokenizer
from distill.main import USER_ERRORS
from distill.train import optimizer as opt_lib
from distill.train import run as run_lib
from distill.train import state as state_lib
from distill.train import trainer
from tests.helpers import small_config

ACCEPTED, CLEAR_ERROR, UNBUILDABLE = 'accepted', 'clear error', 'unbuildable'

# ---------------------------------------------------------------------- config overrides

_ints = st.one_of(st.integers(-3, 3), st.integers(-2**40, 2**40), st.sampled_from([8, 16, 64]))
_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 0.5, 1.0]))
# (field, values): numeric fields get any magnitude and sign, names any string.
FIELDS = {
    'total_steps': _ints, 'checkpoint_steps': _ints, 'log_steps': _ints, 'eval_steps': _ints,
    'keep_checkpoints': _ints, 'data.batch_size': _ints, 'data.eval_batch_size': _ints,
    'task.prompt_len': _ints, 'task.completion_len': _ints, 'eval.max_batches': _ints,
    'optimizer.learning_rate': _floats, 'optimizer.warmup_steps': _ints,
    'optimizer.final_lr_fraction': _floats, 'optimizer.weight_decay': _floats,
    'optimizer.b1': _floats, 'optimizer.b2': _floats, 'optimizer.clip_norm': _floats,
    'loss.temperature': _floats, 'loss.kd_weight': _floats, 'loss.ce_weight': _floats,
    'loss.chunk_size': _ints, 'loss.reduction': st.text(max_size=12),
    'loss.divergence': st.text(max_size=12), 'nonfinite': st.text(max_size=6),
    'model.d_model': _ints, 'model.n_heads': _ints, 'model.n_layers': _ints,
    'model.d_ff': _ints, 'model.vocab_size': _ints, 'model.max_seq_len': _ints,
}
# One to three fields of FIELDS, each with a value drawn from its strategy.
config_overrides = st.dictionaries(st.sampled_from(sorted(FIELDS)), st.none(), min_size=1,
                                   max_size=3).flatmap(
    lambda keys: st.fixed_dictionaries({k: FIELDS[k] for k in keys}))


def _set(config, dotted, value):
  *parents, leaf = dotted.split('.')
  node = config
  for name in parents:
    node = node[name]
  node[leaf] = value


def check_config_overrides(overrides: dict) -> str:
  config = small_config('arithmetic_student', 'small,scratch')
  config.mesh.data = 1
  config.loss.kd_weight = 0.0
  for field, value in overrides.items():
    _set(config, field, value)
  with tempfile.TemporaryDirectory() as workdir:
    try:
      run = run_lib.build_run(config, workdir)
      method = trainer.make_method(run)
      optimizer = opt_lib.make_optimizer(run.config)
      state_lib.abstract_train_state(   # as trainer._train creates it, but only its shapes
          run.model_config, optimizer, jax.random.PRNGKey(run.config.seed), run.mesh,
          algo_state_fn=lambda: method.init_state(optimizer),
          initial_params=run.initial_params, rules=run.rules)
    except USER_ERRORS as e:
      message = str(e)
      assert any(field.split('.')[-1] in message for field in overrides), (overrides, message)
      return CLEAR_ERROR
  return ACCEPTED


# ---------------------------------------------------------------------- data rows

# Any text, or text of the tokenizer's characters; and files of well-formed rows only, half the
# time: else nearly every file holds a row refused for its shape or for a character the
# tokenizer lacks, and the accepting path is barely drawn.
_vocab_text = st.text(alphabet=CharTokenizer().chars, max_size=10)
_text = st.text(max_size=10) | _vocab_text
_well_formed = st.fixed_dictionaries({'prompt': _vocab_text, 'completion': _vocab_text})
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) |
                     st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
_row = st.one_of(
    st.fixed_dictionaries({'prompt': _text, 'completion': _text}),
    st.dictionaries(st.sampled_from(['prompt', 'completion', 'x']), _json, max_size=3), _json)
_line = st.one_of(_row.map(json.dumps), st.text(max_size=20),
                  st.binary(max_size=12).map(lambda b: b.decode('latin-1')))
jsonl_lines = (st.lists(_line, min_size=1, max_size=6) |
               st.lists(_well_formed.map(json.dumps), min_size=1, max_size=6))
parquet_rows = (st.lists(st.fixed_dictionaries({'prompt': st.none() | _text | st.integers(),
                                                'completion': st.none() | _text}),
                         min_size=1, max_size=5) |
                st.lists(_well_formed, min_size=1, max_size=5))


def _read_all(source_class, path: str, location: str) -> str:
  """ACCEPTED when every train example of the file goes through the tokenizer, as the pipeline
  does; CLEAR_ERROR when it stops with a user error naming `location` (the file and its line
  or row) or an empty file."""
  from distill.data import pipeline
  try:
    source = source_class(path)
    for i in range(source.num_examples('train')):
      pipeline.encode_example(CharTokenizer(), *source.example('train', i), prompt_len=64,
                              completion_len=64, name=source.where(i))
  except USER_ERRORS as e:
    assert location in str(e) or 'no examples in' in str(e), str(e)
    return CLEAR_ERROR
  return ACCEPTED


def check_jsonl_lines(lines: list[str], directory: str) -> str:
  path = os.path.join(directory, 'data.jsonl')
  with open(path, 'w', encoding='utf-8', errors='surrogatepass') as f:
    f.write('\n'.join(line.replace('\n', ' ').replace('\r', ' ') for line in lines) + '\n')
  return _read_all(sources.JsonlSource, path, f'{path}:')


def check_parquet_rows(rows: list[dict], directory: str) -> str:
  import pyarrow as pa
  import pyarrow.parquet as pq
  path = os.path.join(directory, 'data.parquet')
  try:
    table = pa.Table.from_pylist(rows)
  except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
    return UNBUILDABLE   # mixed column types: pyarrow cannot build this table
  pq.write_table(table, path)
  return _read_all(sources.ParquetSource, path, f'{path} row ')
