"""The HMM language's exact quantities against brute-force enumeration and sampling."""
import itertools
import math
from collections import Counter

import numpy as np
import pytest

from distill.data.hmm_language import HMMLanguage, HMMTask, distinct_n, empirical_entropy
from distill.data.pipeline import make_iterator
from distill.data.tasks import sequence_lengths
from distill.data.tokenizer import CharTokenizer

TOK = CharTokenizer()
MIN_LEN, MAX_LEN = 1, 4


@pytest.fixture(scope='module')
def tiny():
  """3 states, 2 letters, texts of 1..4 letters: small enough to enumerate."""
  rng = np.random.default_rng(0)
  return HMMLanguage(initial_S=rng.dirichlet([1.0] * 3), transition_SxS=rng.dirichlet([0.7] * 3, 3),
                     letters_SxK=rng.dirichlet([0.7] * 2, 3), stop_S=rng.uniform(0.2, 0.6, 3),
                     min_len=MIN_LEN, max_len=MAX_LEN)


def brute_force_text_probs(lang):
  """P(complete text) for every text, summing over every hidden state path."""
  pi, A, L, stop = lang.initial_S, lang.transition_SxS, lang.letters_SxK, lang.stop_S
  probs = {}
  for m in range(lang.min_len, lang.max_len + 1):
    for text in itertools.product(range(lang.num_symbols), repeat=m):
      total = 0.0
      for path in itertools.product(range(lang.num_states), repeat=m + 1):
        p = pi[path[0]]
        for n in range(m):
          p *= L[path[n], text[n]] * (1 - stop[path[n]] if n >= lang.min_len else 1.0)
          p *= A[path[n], path[n + 1]]
        p *= stop[path[m]] if m < lang.max_len else 1.0  # the end mark at position m
        total += p
      probs[''.join(lang.symbols[i] for i in text)] = total
  return probs


def prefix_prob(probs, prefix):
  return sum(p for text, p in probs.items() if text.startswith(prefix))


def test_forward_algorithm_matches_brute_force(tiny):
  probs = brute_force_text_probs(tiny)
  assert math.isclose(sum(probs.values()), 1.0, rel_tol=1e-12)
  for text, p in probs.items():
    ids = TOK.encode(text)
    assert math.isclose(tiny.sequence_logprob(ids + [TOK.eos_id]), math.log(p), rel_tol=1e-10)
    assert math.isclose(tiny.sequence_logprob(ids), math.log(prefix_prob(probs, text)),
                        rel_tol=1e-10)
  assert tiny.sequence_logprob([]) == 0.0
  assert tiny.sequence_logprob([TOK.eos_id]) == -np.inf  # shorter than min_len
  assert tiny.sequence_logprob(TOK.encode('c')) == -np.inf  # not one of its letters


def test_next_token_logprobs_matches_brute_force(tiny):
  probs = brute_force_text_probs(tiny)
  texts = ['', 'a', 'ba', 'abb', 'bbab']
  T = 7
  tokens = np.zeros((len(texts), T), np.int32)
  mask = np.zeros_like(tokens)
  for r, text in enumerate(texts):  # left-padded by r columns, like pipeline prompts
    row = [TOK.bos_id] + TOK.encode(text)
    tokens[r, r % 2:r % 2 + len(row)] = row
    mask[r, r % 2:r % 2 + len(row)] = 1
  logp = tiny.next_token_logprobs(tokens, mask)
  assert logp.shape == (len(texts), T, TOK.vocab_size) and logp.dtype == np.float64
  eos, letters = TOK.eos_id, TOK.encode('ab')
  for r, text in enumerate(texts):
    start = r % 2
    for n in range(len(text) + 1):
      prefix, row = text[:n], logp[r, start + n]
      denom = prefix_prob(probs, prefix)
      want = {letters[k]: prefix_prob(probs, prefix + s) / denom for k, s in enumerate('ab')}
      want[eos] = probs.get(prefix, 0.0) / denom
      for tok_id in range(TOK.vocab_size):
        if want.get(tok_id, 0.0) == 0.0:
          assert row[tok_id] == -np.inf, (text, n, tok_id)
        else:
          assert math.isclose(np.exp(row[tok_id]), want[tok_id], rel_tol=1e-10)
    # columns outside the text: a point mass on pad
    for t in [*range(start), *range(start + len(text) + 1, T)]:
      assert logp[r, t, TOK.pad_id] == 0.0 and np.isinf(np.delete(logp[r, t], TOK.pad_id)).all()


def test_forced_end_and_after_eos(tiny):
  full = [TOK.bos_id] + TOK.encode('abab') + [TOK.eos_id, TOK.pad_id]
  tokens = np.array([full])
  logp = tiny.next_token_logprobs(tokens, (tokens != TOK.pad_id).astype(np.int32))[0]
  assert logp[4, TOK.eos_id] == 0.0  # max_len letters: the text must end
  assert logp[5, TOK.pad_id] == 0.0 and logp[6, TOK.pad_id] == 0.0


def test_impossible_prefix_and_bad_rows(tiny):
  tokens = np.array([[TOK.bos_id] + TOK.encode('a9b')])
  logp = tiny.next_token_logprobs(tokens, np.ones_like(tokens))[0]
  assert np.isfinite(logp[1]).any()
  assert np.isneginf(logp[2:]).all()  # after '9' the prefix has probability zero
  with pytest.raises(ValueError, match='not BOS'):
    tiny.next_token_logprobs(np.array([[5, 1, 6]]), np.array([[1, 1, 1]]))
  with pytest.raises(ValueError, match='no pad/BOS'):
    tiny.sequence_logprob([TOK.bos_id, 13])


def test_sampling_frequencies_match_exact_probabilities(tiny):
  probs = brute_force_text_probs(tiny)
  n = 40_000
  counts = Counter(tiny.sample(np.random.default_rng(1), n))
  assert set(counts) <= set(probs)
  tv = 0.5 * sum(abs(counts[t] / n - p) for t, p in probs.items())
  assert tv < 0.03  # 30 texts, 40k draws: the sampling noise of TV is ~0.01
  # the first-letter distribution read off next_token_logprobs at BOS
  first = np.exp(tiny.next_token_logprobs(np.array([[TOK.bos_id]]), np.array([[1]]))[0, 0])
  for k, s in enumerate('ab'):
    freq = sum(c for t, c in counts.items() if t[0] == s) / n
    assert abs(freq - first[TOK.encode(s)[0]]) < 4 * math.sqrt(0.25 / n)


def test_default_language_on_pipeline_batches():
  task = HMMTask(seed=0)
  lang = task.language
  P, C = sequence_lengths(task)
  batch = next(make_iterator(task, TOK, split='train', prompt_len=P, completion_len=C,
                             batch_size=32, seed=0))
  logp = task.next_token_logprobs(batch['tokens'], batch['input_mask'])
  np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, rtol=1e-12)
  never = [TOK.pad_id, TOK.bos_id] + TOK.encode('0+#z')
  loss = batch['loss_mask'] > 0
  assert np.isneginf(logp[loss][:, never]).all()
  # every target of a true sample is possible, and the per-token entropy is moderate
  target_logp = np.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
  assert np.isfinite(target_logp[loss]).all()
  assert 0.8 < -target_logp[loss].mean() < 2.4
  # a text's log-prob is the sum of its per-token log-probs
  r = 0
  ids = [int(t) for t in batch['tokens'][r][batch['input_mask'][r] > 0][1:]]
  assert math.isclose(lang.sequence_logprob(ids), target_logp[r][loss[r]].sum()
                      + target_logp[r][P - 1 - task.prompt_symbols:P - 1].sum(), rel_tol=1e-10)


def test_hmm_task_examples():
  task = HMMTask(seed=3, prompt_symbols=2, eval_size=100)
  lang = task.language
  examples = [task.example('eval', i) for i in range(100)]
  assert examples == [HMMTask(seed=3, prompt_symbols=2).example('eval', i) for i in range(100)]
  assert examples != [task.example('train', i) for i in range(100)]
  for prompt, completion in examples:
    assert len(prompt) == 2
    assert lang.min_len <= len(prompt + completion) <= lang.max_len
    assert set(prompt + completion) <= set(lang.symbols)
  with pytest.raises(ValueError, match='prompt_symbols'):
    HMMTask(prompt_symbols=5)
  with pytest.raises(IndexError):
    task.example('eval', 100)


def test_diversity_helpers():
  assert distinct_n(['abab', 'ab'], 2) == 2 / 4  # ab, ba, ab, ab
  assert distinct_n(['a'], 2) == 0.0
  assert empirical_entropy(['x', 'y', 'z', 'w']) == pytest.approx(math.log(4))
  assert empirical_entropy(['x', 'x', 'x']) == 0.0
  assert empirical_entropy(['x', 'x', 'y', 'y']) == pytest.approx(math.log(2))
