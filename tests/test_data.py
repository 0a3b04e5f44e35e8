"""Tokenizer, arithmetic task, task registry and grain pipelines."""
import re

import numpy as np
import pytest

from distill.data import arithmetic
from distill.data.arithmetic import ArithmeticTask, KeyedPermutation
from distill.data.pipeline import encode_example, make_dataset, make_eval_iterator, make_iterator
from distill.data.tasks import get_task, sequence_lengths
from distill.data.tokenizer import CharTokenizer

TOK = CharTokenizer()


class ListTask:
  """A task over a fixed list of examples (declares no maximum lengths)."""
  name = 'list'
  splits = ('train', 'eval')

  def __init__(self, examples):
    self.examples = examples

  def num_examples(self, split):
    return len(self.examples)

  def example(self, split, index):
    return self.examples[index]


def numbered_task(n):
  """Example i is ('<i>=', '<i>') so a row tells which example it came from."""
  return ListTask([(f'{i}=', str(i)) for i in range(n)])


def row_ids(batch):
  """Example ids of the real rows of a numbered_task batch."""
  return [int(TOK.decode(row).split('=')[0]) for row, m in zip(batch['tokens'], batch['input_mask'])
          if m.any()]


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_vocab_and_round_trip():
  assert (TOK.pad_id, TOK.bos_id, TOK.eos_id) == (0, 1, 2)
  assert TOK.vocab_size <= 64 and TOK.vocab_size == 3 + len(TOK.chars)
  text = ''.join(TOK.chars)
  ids = TOK.encode(text)
  assert ids == list(range(3, TOK.vocab_size))
  assert TOK.decode(ids) == text
  assert TOK.decode([0, 0, 1] + TOK.encode('12+3') + [2] + TOK.encode('9') + [0]) == '12+3'
  assert TOK.decode(np.array(TOK.encode('ab c'), np.int32)) == 'ab c'


def test_tokenizer_errors_and_fingerprint():
  with pytest.raises(ValueError, match="'Q'"):
    TOK.encode('abQ')
  with pytest.raises(ValueError, match='outside the vocabulary'):
    TOK.decode([3, 999])
  assert TOK.fingerprint() == CharTokenizer().fingerprint()
  other = CharTokenizer()
  other._id_to_token = other._id_to_token[:-1] + ('!',)
  assert other.fingerprint() != TOK.fingerprint()


# ---------------------------------------------------------------- arithmetic

STEP_RE = re.compile(r'(\d)([+-])(\d)\2(\d)=(\d)(\d);')


def check_working(a, op, b, num_digits, completion):
  """Re-derives every step of the working from the operands, independently."""
  body, final = completion.split('#')
  steps = STEP_RE.findall(body)
  assert ''.join(f'{x}{o}{y}{o}{c}={co}{d};' for x, o, y, c, co, d in steps) == body
  assert len(steps) == num_digits
  carry, digits = 0, []
  for k, (x, o, y, c, co, d) in enumerate(steps):
    x, y, c, co, d = map(int, (x, y, c, co, d))
    assert o == op
    assert (x, y) == (a // 10**k % 10, b // 10**k % 10)  # operand columns, units first
    assert c == carry
    if op == '+':
      assert x + y + c == 10 * co + d
    else:
      assert x - y - c == d - 10 * co
    carry = co
    digits.append(d)
  expected = a + b if op == '+' else a - b
  assert final == str(expected)
  # The answer is readable off the steps: final carry then digits, most significant first.
  assert int(''.join(map(str, [carry * (op == '+')] + digits[::-1]))) == expected


@pytest.mark.parametrize('num_digits,ops', [(1, '+-'), (2, '+-'), (3, '+'), (4, '-')])
def test_arithmetic_working_is_correct(num_digits, ops):
  task = ArithmeticTask(num_digits, ops=tuple(ops), seed=3, eval_size=20)
  for split in ('train', 'eval'):
    for i in range(min(300, task.num_examples(split))):
      prompt, completion = task.example(split, i)
      a, op, b = re.fullmatch(r'(\d+)([+-])(\d+)=', prompt).groups()
      assert len(a) == len(b) == num_digits and a[0] != '0' and b[0] != '0'
      a, b = int(a), int(b)
      assert op != '-' or a >= b
      check_working(a, op, b, num_digits, completion)
      assert arithmetic.score(prompt, completion) == 1.0
      assert len(prompt) <= task.max_prompt_chars
      assert len(completion) <= task.max_completion_chars


def test_working_examples_from_docs():
  assert arithmetic.working(357, '+', 468, 3) == '7+8+0=15;5+6+1=12;3+4+1=08;#825'
  assert arithmetic.working(402, '-', 357, 3) == '2-7-0=15;0-5-1=14;4-3-1=00;#45'
  assert arithmetic.working(999, '+', 999, 3).endswith('#1998')


def test_arithmetic_score():
  assert arithmetic.score('12+30=', '2+0+0=02;1+3+0=04;#42') == 1.0
  assert arithmetic.score('12+30=', 'garbage#42') == 1.0  # graded by the final answer only
  assert arithmetic.score('12+30=', '#43') == 0.0
  assert arithmetic.score('12+30=', '#042') == 0.0
  assert arithmetic.score('12+30=', '42') == 0.0
  assert arithmetic.score('12+30=', '#42#41') == 0.0
  assert arithmetic.score('50-8=', '#42') == 1.0
  with pytest.raises(ValueError, match='not an arithmetic prompt'):
    arithmetic.score('12*3=', '#36')


@pytest.mark.parametrize('n', [1, 2, 7, 100, 1000, 4097])
def test_keyed_permutation_is_bijection(n):
  perm = KeyedPermutation(n, seed=11)
  assert sorted(perm(i) for i in range(n)) == list(range(n))
  if n >= 100:
    assert [perm(i) for i in range(10)] != [KeyedPermutation(n, seed=12)(i) for i in range(10)]


def test_arithmetic_splits_disjoint_and_cover_problem_space():
  task = ArithmeticTask(2, ops=('+', '-'), seed=5, eval_size=300)
  problems = lambda split: [task.problem(task.problem_id(split, i))
                            for i in range(task.num_examples(split))]
  train, eval_ = problems('train'), problems('eval')
  assert len(set(eval_)) == 300 and len(set(train)) == len(train)
  assert not set(train) & set(eval_)
  every = {(a, '+', b) for a in range(10, 100) for b in range(10, 100)}
  every |= {(a, '-', b) for a in range(10, 100) for b in range(10, a + 1)}
  assert set(train) | set(eval_) == every
  with pytest.raises(IndexError):
    task.example('eval', 300)


def test_arithmetic_examples_pure_function_of_seed_split_index():
  t1, t2, t3 = ArithmeticTask(seed=1), ArithmeticTask(seed=1), ArithmeticTask(seed=2)
  ev = [t1.example('eval', i) for i in range(50)]
  assert ev == [t2.example('eval', i) for i in range(50)]
  assert ev != [t3.example('eval', i) for i in range(50)]
  eval_prompts = {t1.example('eval', i)[0] for i in range(t1.num_examples('eval'))}
  assert not eval_prompts & {t1.example('train', i)[0] for i in range(0, 800_000, 97)}


def test_arithmetic_bad_config():
  with pytest.raises(ValueError, match='ops'):
    ArithmeticTask(2, ops=('*',))
  with pytest.raises(ValueError, match='eval_size'):
    ArithmeticTask(1, eval_size=81)
  with pytest.raises(ValueError, match='unknown split'):
    ArithmeticTask(2).num_examples('test')


def test_registry():
  arith, hmm = get_task('arithmetic', num_digits=2), get_task('hmm', prompt_symbols=2)
  assert (arith.name, arith.num_digits, hmm.name, hmm.prompt_symbols) == ('arithmetic', 2, 'hmm', 2)
  # optional members exist only where meaningful (evaluation checks with hasattr)
  assert hasattr(arith, 'score') and not hasattr(arith, 'next_token_logprobs')
  assert hasattr(hmm, 'next_token_logprobs') and not hasattr(hmm, 'score')
  with pytest.raises(ValueError, match=r"\['arithmetic', 'hmm', 'jsonl', 'parquet', 'tfds'\]"):
    get_task('sudoku')


# ---------------------------------------------------------------- pipeline

def check_row(row, prompt, completion, P, C):
  tokens, targets = row['tokens'], row['targets']
  p, c = TOK.encode(prompt), TOK.encode(completion)
  n_left = P - 1 - len(p)
  assert tokens.shape == (P + C,) and tokens.dtype == np.int32
  assert (tokens[:n_left] == TOK.pad_id).all()
  assert tokens[n_left] == TOK.bos_id
  assert list(tokens[n_left + 1:P]) == p  # prompt ends at column P-1
  assert list(tokens[P:P + len(c)]) == c
  assert tokens[P + len(c)] == TOK.eos_id
  assert (tokens[P + len(c) + 1:] == TOK.pad_id).all()
  assert list(targets[:-1]) == list(tokens[1:]) and targets[-1] == TOK.pad_id
  assert list(row['input_mask']) == [int(t != TOK.pad_id) for t in tokens]
  # loss exactly where the target is a completion char or the closing EOS
  expected = np.zeros(P + C, np.float32)
  expected[P - 1:P + len(c)] = 1
  np.testing.assert_array_equal(row['loss_mask'], expected)
  assert row['loss_mask'].dtype == np.float32
  assert (targets[row['loss_mask'] > 0] != TOK.pad_id).all()
  assert targets[row['loss_mask'] > 0][-1] == TOK.eos_id


@pytest.mark.parametrize('prompt,completion', [('12+3=', '15'), ('', 'ab'), ('ab', ''), ('', '')])
def test_encode_example_layout(prompt, completion):
  check_row(encode_example(TOK, prompt, completion, prompt_len=7, completion_len=4),
            prompt, completion, 7, 4)


def test_encode_example_exact_fit_and_errors():
  check_row(encode_example(TOK, 'abc', 'de', prompt_len=4, completion_len=3), 'abc', 'de', 4, 3)
  with pytest.raises(ValueError, match=r'ex 7: prompt .* 5 tokens .* prompt_len=4'):
    encode_example(TOK, 'abcd', '', prompt_len=4, completion_len=3, name='ex 7')
  with pytest.raises(ValueError, match=r'completion .* 4 tokens .* completion_len=3'):
    encode_example(TOK, '', 'abc', prompt_len=4, completion_len=3)


def test_batches_layout_arithmetic():
  task = ArithmeticTask(3, seed=0)
  P, C = sequence_lengths(task)
  assert P + C <= 64
  it = make_iterator(task, TOK, split='train', prompt_len=P, completion_len=C, batch_size=8,
                     seed=0, shuffle=False)
  batch = next(it)
  assert set(batch) == {'tokens', 'targets', 'input_mask', 'loss_mask'}
  assert all(v.shape == (8, P + C) for v in batch.values())
  for r in range(8):
    check_row({k: v[r] for k, v in batch.items()}, *task.example('train', r), P, C)


def test_too_long_examples_raise():
  task = ArithmeticTask(3)
  with pytest.raises(ValueError, match='completion_len=20 is too short'):
    make_dataset(task, TOK, split='train', prompt_len=9, completion_len=20, seed=0)
  ds = make_dataset(ListTask([('ab', 'c'), ('abcdef', 'c')]), TOK, split='train', prompt_len=4,
                    completion_len=4, seed=0, shuffle=False, num_epochs=1)
  ds[0]
  with pytest.raises(ValueError, match=r'list train example 1: prompt .* prompt_len=4'):
    ds[1]


def test_determinism_and_state_restore():
  task = ArithmeticTask(2, seed=0)
  kw = dict(split='train', prompt_len=7, completion_len=24, batch_size=4)
  a, b = make_iterator(task, TOK, seed=1, **kw), make_iterator(task, TOK, seed=1, **kw)
  first = [next(a) for _ in range(3)]
  for x, y in zip(first, [next(b) for _ in range(3)]):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(next(make_iterator(task, TOK, seed=2, **kw))['tokens'],
                            first[0]['tokens'])
  state = a.get_state()
  expected = [next(a) for _ in range(3)]
  fresh = make_iterator(task, TOK, seed=1, **kw)
  fresh.set_state(state)
  for x, y in zip(expected, [next(fresh) for _ in range(3)]):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_epochs_are_permutations_reshuffled():
  task = numbered_task(10)
  it = make_iterator(task, TOK, split='train', prompt_len=4, completion_len=3, batch_size=10,
                     seed=0, num_epochs=2)
  e1, e2 = row_ids(next(it)), row_ids(next(it))
  assert sorted(e1) == sorted(e2) == list(range(10))
  assert e1 != e2 and e1 != list(range(10))
  with pytest.raises(StopIteration):
    next(it)


@pytest.mark.parametrize('shuffle', [False, True])
def test_shards_disjoint_and_complete(shuffle):
  task, n, count = numbered_task(23), 23, 3
  seen = []
  for shard in range(count):
    it = make_iterator(task, TOK, split='train', prompt_len=4, completion_len=3, batch_size=2,
                       seed=0, shuffle=shuffle, num_epochs=1, shard_index=shard,
                       shard_count=count, drop_remainder=False)
    seen.append([i for batch in it for i in row_ids(batch)])
  flat = [i for s in seen for i in s]
  assert sorted(flat) == list(range(n))  # each example exactly once over all shards
  with pytest.raises(ValueError, match='shard_index'):
    make_dataset(task, TOK, split='train', prompt_len=4, completion_len=3, seed=0,
                 shard_index=3, shard_count=3)


def test_eval_iterator_pads_and_stays_in_lockstep():
  task, count, B = numbered_task(11), 2, 4
  per_shard, padding_rows = [], 0
  for shard in range(count):
    batches = list(make_eval_iterator(task, TOK, prompt_len=4, completion_len=3, batch_size=B,
                                      shard_index=shard, shard_count=count))
    assert all(b['tokens'].shape == (B, 7) for b in batches)
    for b in batches:
      for row in range(B):
        if not b['input_mask'][row].any():  # padding rows carry nothing
          assert not b['loss_mask'][row].any() and (b['tokens'][row] == TOK.pad_id).all()
          padding_rows += 1
    per_shard.append(batches)
  assert padding_rows == 2 * 2 * B - 11   # 2 shards x 2 batches of B rows hold the 11 examples
  assert len(per_shard[0]) == len(per_shard[1]) == 2  # ceil(ceil(11/2)/4)
  ids = [i for batches in per_shard for b in batches for i in row_ids(b)]
  assert sorted(ids) == list(range(11))
  # unshuffled: shard 0 reads examples 0, 2, 4, ... in order
  assert [i for b in per_shard[0] for i in row_ids(b)] == [0, 2, 4, 6, 8, 10]


def test_pipeline_rejects_bad_split():
  with pytest.raises(ValueError, match="no split 'test'"):
    make_iterator(ArithmeticTask(2), TOK, split='test', prompt_len=7, completion_len=24,
                  batch_size=2, seed=0)
