"""Multi-digit arithmetic with step-by-step working, graded by the exact final answer.

A reasoning-trace distillation task in miniature. Prompt and completion look like

    prompt      357+468=
    completion  7+8+0=15;5+6+1=12;3+4+1=08;#825

One fixed-width step per column, least significant column first: the two operand
digits, the incoming carry, then '=' and two digits (outgoing carry, result digit).
Subtraction (a >= b, so results are never negative) uses the same layout with borrows:
`402-357=` -> `2-7-0=15;0-5-1=14;4-3-1=00;#45`. The answer after '#' is written most
significant digit first, without leading zeros. Fixed widths put every character a
constant distance from the characters it depends on, which is what lets a tiny
character-level model learn the task quickly (measurements at DEFAULT_NUM_DIGITS).

Every problem (op, a, b) with exactly `num_digits`-digit operands has an integer id;
a keyed bijection of [0, num_problems) lists the problems in a seeded order whose first
`eval_size` entries form the held-out split and the rest the training split, so the
splits are disjoint by construction and example i of a split is a pure function of
(seed, split, i).
"""
import math
import re

# Learnability, measured with a pre-norm RoPE char transformer (GELU MLP x4, heads of
# 32 dims), batch 64, AdamW 3e-3 after 100 warmup steps, fp32, 512 held-out problems:
# - steps until >= 90% teacher-forced exact match (a lower bound on greedy exact match),
#   3 digits: 250-350 for every size tried (0.34M, 0.8M, 1.2M, 1.8M params; 3.2M at
#   lr 1e-3: 250); 2 digits: 300-350. Greedy held-out accuracy 100% by 3000 steps.
# - 120 s wall clock on 2 pinned Xeon cores (compile and data generation included):
#   3 digits (T=42): 0.8M (d=128, 4 layers) 400 steps -> 99.6% greedy exact match;
#   1.2M (d=128, 6 layers) 300 steps -> 81%; 1.8M (d=192, 4 layers) 270 steps -> 71%
#   (these need ~150-180 s for 90%). 2 digits (T=30): 0.8M 590 steps -> 100%.
# So 3-digit addition is the default: a ~1M model learns it in about 2 minutes on a
# laptop; use num_digits=2 for bigger models on that budget.
DEFAULT_NUM_DIGITS = 3
SPLITS = ('train', 'eval')
OPS = ('+', '-')
_STEP_WIDTH = len('7+8+0=15;')
_PROMPT_RE = re.compile(r'^(\d+)([+-])(\d+)=$')
_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
  """splitmix64 finaliser: a cheap, well-mixed 64-bit hash of an integer."""
  x = (x + 0x9E3779B97F4A7C15) & _MASK64
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
  return x ^ (x >> 31)


class KeyedPermutation:
  """A seeded bijection of [0, n): a balanced Feistel network with cycle walking.

  O(1) memory and time per index, so problem spaces of any size can be split and
  ordered without enumerating them.
  """

  def __init__(self, n: int, seed: int, rounds: int = 6):
    if n < 1:
      raise ValueError(f'KeyedPermutation needs n >= 1, got {n}')
    self.n = n
    self._half_bits = max(1, math.ceil(max(1, (n - 1).bit_length()) / 2))
    self._half_mask = (1 << self._half_bits) - 1
    self._keys = [_mix64((seed << 8) ^ r ^ 0x5EED) for r in range(rounds)]

  def _feistel(self, x: int) -> int:
    left, right = x >> self._half_bits, x & self._half_mask
    for key in self._keys:
      left, right = right, left ^ (_mix64(right ^ key) & self._half_mask)
    return (left << self._half_bits) | right

  def __call__(self, index: int) -> int:
    if not 0 <= index < self.n:
      raise IndexError(f'index {index} out of range [0, {self.n})')
    # The Feistel domain is at most 4n, so walking the cycle until we land back in
    # [0, n) stays a bijection and takes < 4 steps on average.
    x = self._feistel(index)
    while x >= self.n:
      x = self._feistel(x)
    return x


def working(a: int, op: str, b: int, num_digits: int) -> str:
  """The completion for `a op b`: fixed-width column steps, then '#' and the answer."""
  steps, carry = [], 0
  for k in range(num_digits):
    x, y, carry_in = a // 10**k % 10, b // 10**k % 10, carry
    total = x + y + carry_in if op == '+' else x - y - carry_in
    carry, digit = int(not 0 <= total <= 9), total % 10
    steps.append(f'{x}{op}{y}{op}{carry_in}={carry}{digit};')
  return ''.join(steps) + '#' + str(a + b if op == '+' else a - b)


def answer(prompt: str) -> int:
  """The exact result of an arithmetic prompt such as '357+468='."""
  m = _PROMPT_RE.match(prompt)
  if m is None:
    raise ValueError(f'not an arithmetic prompt (expected e.g. "357+468="): {prompt!r}')
  a, op, b = int(m[1]), m[2], int(m[3])
  return a + b if op == '+' else a - b


def score(prompt: str, completion: str) -> float:
  """1.0 iff the text after the last '#' of `completion` is exactly the answer."""
  _, hash_sign, final = completion.rpartition('#')
  return float(bool(hash_sign) and final == str(answer(prompt)))


class ArithmeticTask:
  """Arithmetic with working over operands of exactly `num_digits` digits."""

  name = 'arithmetic'
  splits = SPLITS

  def __init__(self, num_digits: int = DEFAULT_NUM_DIGITS, ops: str | tuple[str, ...] = ('+',),
               seed: int = 0, eval_size: int = 512):
    if not 1 <= num_digits <= 9:
      raise ValueError(f'num_digits must be in [1, 9], got {num_digits}')
    ops = tuple(ops)
    if not ops or any(o not in OPS for o in ops) or len(set(ops)) != len(ops):
      raise ValueError(f'ops must be distinct operators from {OPS}, got {ops!r}')
    self.num_digits, self.ops, self.seed = num_digits, ops, seed
    self._lo = 10**(num_digits - 1)
    self._m = 9 * self._lo  # how many num_digits-digit numbers there are
    # Addition: all ordered pairs. Subtraction: pairs with a >= b (row-major triangle).
    self._block_sizes = [self._m**2 if o == '+' else self._m * (self._m + 1) // 2 for o in ops]
    self.num_problems = sum(self._block_sizes)
    if not 0 < eval_size < self.num_problems:
      raise ValueError(
          f'eval_size must be in (0, {self.num_problems}) for {num_digits}-digit {ops}, '
          f'got {eval_size}')
    self.eval_size = eval_size
    self._perm = KeyedPermutation(self.num_problems, seed)
    self.max_prompt_chars = 2 * num_digits + 2
    # The answer has at most num_digits + 1 digits (a final carry).
    self.max_completion_chars = num_digits * _STEP_WIDTH + 1 + num_digits + 1

  def num_examples(self, split: str) -> int:
    self._check_split(split)
    return self.eval_size if split == 'eval' else self.num_problems - self.eval_size

  def problem(self, problem_id: int) -> tuple[int, str, int]:
    """(a, op, b) of a problem id in [0, num_problems)."""
    for op, size in zip(self.ops, self._block_sizes):
      if problem_id < size:
        break
      problem_id -= size
    if op == '+':
      i, j = divmod(problem_id, self._m)
    else:  # row i of the triangle holds i + 1 pairs (i, 0..i)
      i = (math.isqrt(8 * problem_id + 1) - 1) // 2
      j = problem_id - i * (i + 1) // 2
    return self._lo + i, op, self._lo + j

  def problem_id(self, split: str, index: int) -> int:
    """The id of example `index` of `split` (eval ids are the permutation's head)."""
    n = self.num_examples(split)
    if not 0 <= index < n:
      raise IndexError(f'{split} example {index} out of range [0, {n})')
    return self._perm(index if split == 'eval' else self.eval_size + index)

  def example(self, split: str, index: int) -> tuple[str, str]:
    a, op, b = self.problem(self.problem_id(split, index))
    return f'{a}{op}{b}=', working(a, op, b, self.num_digits)

  score = staticmethod(score)

  def _check_split(self, split: str):
    if split not in SPLITS:
      raise ValueError(f'unknown split {split!r}; valid: {SPLITS}')

  def __repr__(self) -> str:
    return (f'ArithmeticTask(num_digits={self.num_digits}, ops={self.ops}, seed={self.seed}, '
            f'eval_size={self.eval_size})')
