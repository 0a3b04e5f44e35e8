"""A synthetic language with an exactly known distribution: a random hidden Markov model.

A text is a sequence of symbols x_0 x_1 ... x_{m-1} followed by an end-of-text mark:
z_0 ~ initial, z_{n+1} ~ transition[z_n], and x_n ~ the emission row of z_n at position
n, where
  - positions n < min_len never end the text (emission = letters[z]),
  - positions min_len <= n < max_len end it with probability stop[z]
    (emission = ((1 - stop[z]) * letters[z], stop[z])),
  - position max_len always ends it, so texts have min_len..max_len symbols.
Symbols are the first `num_symbols` lowercase letters; the end mark is the tokenizer's
EOS. Because every text has an exact probability (forward algorithm, float64, log
space), a model's KL to the truth is computable in both directions on any prefixes.
"""
import bisect
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

from distill.data.tokenizer import CharTokenizer

_EARLY, _MID, _LAST = 0, 1, 2  # emission regimes by text position (see module doc)


def _log_matmul(log_a_BxS: np.ndarray, p: np.ndarray) -> np.ndarray:
  """log(exp(log_a) @ p) for a probability matrix p [S,N], with the row maximum
  factored out so nothing underflows; -inf rows stay -inf."""
  m_Bx1 = np.max(log_a_BxS, axis=1, keepdims=True)
  m_Bx1 = np.where(np.isfinite(m_Bx1), m_Bx1, 0.0)
  a_BxS = np.exp(log_a_BxS - m_Bx1)
  s_BxN = a_BxS @ p
  with np.errstate(divide='ignore'):
    return np.log(s_BxN) + m_Bx1


def _cdf_rows(p: np.ndarray) -> list[list[float]]:
  """Row CDFs whose tails are exactly 1.0 from the last nonzero entry on, so inverse-CDF
  sampling with u in [0, 1) can never return a zero-probability index."""
  cdf = np.cumsum(p, axis=-1)
  for row, prob in zip(cdf, p):
    row[np.flatnonzero(prob)[-1]:] = 1.0
  return cdf.tolist()


class HMMLanguage:
  """A fixed HMM over letters + EOS; see `HMMLanguage.random` for the seeded generator."""

  def __init__(self, initial_S: np.ndarray, transition_SxS: np.ndarray, letters_SxK: np.ndarray,
               stop_S: np.ndarray, *, min_len: int, max_len: int,
               tokenizer: CharTokenizer | None = None):
    self.initial_S = np.asarray(initial_S, np.float64)
    self.transition_SxS = np.asarray(transition_SxS, np.float64)
    self.letters_SxK = np.asarray(letters_SxK, np.float64)
    self.stop_S = np.asarray(stop_S, np.float64)
    S, K = self.letters_SxK.shape
    for name, p, shape in (('initial', self.initial_S, (S,)),
                           ('transition', self.transition_SxS, (S, S)),
                           ('letters', self.letters_SxK, (S, K))):
      if p.shape != shape or (p < 0).any() or not np.allclose(p.sum(-1), 1.0):
        raise ValueError(f'{name} must be a {shape} array of probability rows, got shape {p.shape}')
    if self.stop_S.shape != (S,) or not ((self.stop_S > 0) & (self.stop_S < 1)).all():
      raise ValueError(f'stop must be {S} probabilities in (0, 1)')
    if not 1 <= K <= 26:
      raise ValueError(f'num_symbols must be in [1, 26], got {K}')
    if not 0 <= min_len <= max_len:
      raise ValueError(f'need 0 <= min_len <= max_len, got {min_len}, {max_len}')
    self.num_states, self.num_symbols = S, K
    self.min_len, self.max_len = min_len, max_len
    self.tokenizer = tokenizer or CharTokenizer()
    self.symbols = string.ascii_lowercase[:K]
    # Language symbol k < K is letter k; symbol K is the end of text (tokenizer EOS).
    self.token_of_symbol = np.array(
        [self.tokenizer.token_id(c) for c in self.symbols] + [self.tokenizer.eos_id])
    self.symbol_of_token = np.full(self.tokenizer.vocab_size, -1)
    self.symbol_of_token[self.token_of_symbol] = np.arange(K + 1)

    stop = self.stop_S[:, None]
    self._emission_3xSxK1 = np.stack([
        np.concatenate([self.letters_SxK, np.zeros((S, 1))], 1),
        np.concatenate([(1 - stop) * self.letters_SxK, stop], 1),
        np.concatenate([np.zeros((S, K)), np.ones((S, 1))], 1)])
    with np.errstate(divide='ignore'):
      self._log_initial_S = np.log(self.initial_S)
      self._log_emission_3xSxK1 = np.log(self._emission_3xSxK1)
    self._initial_cdf = _cdf_rows(self.initial_S[None])[0]
    self._transition_cdf = _cdf_rows(self.transition_SxS)
    self._emission_cdf = [_cdf_rows(e) for e in self._emission_3xSxK1]

  @classmethod
  def random(cls, seed: int = 0, *, num_states: int = 16, num_symbols: int = 12,
             transition_concentration: float = 0.05, emission_concentration: float = 0.05,
             mean_extra_len: float = 10.0, min_len: int = 4, max_len: int = 24,
             tokenizer: CharTokenizer | None = None) -> 'HMMLanguage':
    """A seeded random HMM. Small concentrations give sparse-ish rows (a few likely
    next states and letters per state), so prefixes constrain but do not determine
    continuations. Past min_len a text ends with probability ~1/mean_extra_len per symbol.

    With the defaults the true entropy is ~1.6-1.8 nats/token against ~2.2-2.4 for the
    letter unigram distribution: a model must track the hidden state to do well, and
    many continuations remain plausible.
    """
    rng = np.random.default_rng(seed)
    # Floors keep every probability positive: all letters stay reachable and no
    # prefix is impossible merely because a Dirichlet draw underflowed to zero.
    dirichlet = lambda a, size: (lambda p: p / p.sum(-1, keepdims=True))(
        rng.dirichlet([a] * size, size=num_states) + 1e-6)
    return cls(initial_S=rng.dirichlet([1.0] * num_states),
               transition_SxS=dirichlet(transition_concentration, num_states),
               letters_SxK=dirichlet(emission_concentration, num_symbols),
               stop_S=rng.uniform(0.5, 1.5, num_states) / mean_extra_len,
               min_len=min_len, max_len=max_len, tokenizer=tokenizer)

  def _regime(self, n):
    return np.where(n < self.min_len, _EARLY, np.where(n < self.max_len, _MID, _LAST))

  def next_token_logprobs(self, tokens_BxT: np.ndarray, input_mask_BxT: np.ndarray) -> np.ndarray:
    """True log-distribution [B,T,V] (float64, tokenizer vocabulary) of the token after
    each prefix; a row's text starts after its first real token, which must be BOS.

    At BOS and text positions: the exact next-token distribution (-inf for tokens the
    language never emits). Where nothing follows (padding, after EOS): a point mass on
    pad. After a token the language cannot produce (prefix probability 0): all -inf.
    """
    tokens_BxT, mask_BxT = np.asarray(tokens_BxT), np.asarray(input_mask_BxT) > 0
    if tokens_BxT.ndim != 2 or tokens_BxT.shape != mask_BxT.shape:
      raise ValueError(f'tokens and input_mask must be [B,T] of one shape, got '
                       f'{tokens_BxT.shape} and {mask_BxT.shape}')
    B, T = tokens_BxT.shape
    V, K = self.tokenizer.vocab_size, self.num_symbols
    out_BxTxV = np.full((B, T, V), -np.inf)
    out_BxTxV[:, :, self.tokenizer.pad_id] = 0.0
    started = np.zeros(B, bool)
    live = np.zeros(B, bool)  # started, not ended, not impossible
    impossible = np.zeros(B, bool)
    log_alpha_BxS = np.zeros((B, self.num_states))  # log P(z_n = s, x_<n)
    n_B = np.zeros(B, int)  # symbols consumed so far
    ones_Sx1 = np.ones((self.num_states, 1))
    for t in range(T):
      real, tok = mask_BxT[:, t], tokens_BxT[:, t]
      first = real & ~started
      if (first & (tok != self.tokenizer.bos_id)).any():
        r = int(np.flatnonzero(first & (tok != self.tokenizer.bos_id))[0])
        raise ValueError(f'row {r}: first real token (column {t}) is id {tok[r]}, not BOS '
                         f'({self.tokenizer.bos_id})')
      # Consume this column's symbol on rows whose text is running.
      step = real & live
      sym = self.symbol_of_token[tok]
      emit_BxS = self._log_emission_3xSxK1[self._regime(n_B), :, np.maximum(sym, 0)]
      joint_BxS = log_alpha_BxS + emit_BxS  # log P(z_n, x_<=n)
      dead = step & ((sym < 0) | np.isneginf(joint_BxS).all(1))
      ended = step & ~dead & (sym == K)
      advance = step & ~dead & ~ended
      log_alpha_BxS = np.where(advance[:, None], _log_matmul(joint_BxS, self.transition_SxS),
                               log_alpha_BxS)
      n_B += advance
      log_alpha_BxS[first], n_B[first] = self._log_initial_S, 0
      started |= first
      impossible |= dead
      live = (live | first) & ~dead & ~ended
      # The predictive distribution of the next symbol, for every emission regime.
      pred_3xBxK1 = np.stack([_log_matmul(log_alpha_BxS, e) for e in self._emission_3xSxK1])
      pred_BxK1 = np.take_along_axis(pred_3xBxK1, self._regime(n_B)[None, :, None], 0)[0]
      pred_BxK1 -= _log_matmul(log_alpha_BxS, ones_Sx1)
      emit = real & live
      out_BxTxV[emit | (real & impossible), t, self.tokenizer.pad_id] = -np.inf
      out_BxTxV[:, t, self.token_of_symbol] = np.where(emit[:, None], pred_BxK1, -np.inf)
    return out_BxTxV

  def sequence_logprob(self, token_ids: Sequence[int]) -> float:
    """log P(a text starts with `token_ids`); ending with EOS makes it the probability
    of exactly that complete text. Tokens the language never emits give -inf."""
    ids = [int(i) for i in token_ids]
    specials = {self.tokenizer.pad_id, self.tokenizer.bos_id}
    if any(i in specials for i in ids) or self.tokenizer.eos_id in ids[:-1]:
      raise ValueError(f'sequence_logprob takes the ids of one text (letters, optionally a '
                       f'final EOS; no pad/BOS), got {ids}')
    tokens = np.array([[self.tokenizer.bos_id] + ids])
    logp_TxV = self.next_token_logprobs(tokens, np.ones_like(tokens))[0]
    return float(logp_TxV[np.arange(len(ids)), ids].sum())

  @property
  def _num_uniforms(self) -> int:
    return 2 * self.max_len + 2

  def _sample_text(self, u: Sequence[float]) -> str:
    """One text from 2*max_len + 2 uniforms (initial state, then emission/transition)."""
    z = bisect.bisect_right(self._initial_cdf, u[0])
    out = []
    for n in range(self.max_len + 1):
      regime = _EARLY if n < self.min_len else _MID if n < self.max_len else _LAST
      x = bisect.bisect_right(self._emission_cdf[regime][z], u[2 * n + 1])
      if x == self.num_symbols:
        break
      out.append(self.symbols[x])
      z = bisect.bisect_right(self._transition_cdf[z], u[2 * n + 2])
    return ''.join(out)

  def sample(self, rng: np.random.Generator, n: int) -> list[str]:
    """n independent full texts (symbols only; the end mark is implied)."""
    return [self._sample_text(row) for row in rng.random((n, self._num_uniforms)).tolist()]

  def sample_text(self, key: Sequence[int]) -> str:
    """The text drawn from the stream keyed by `key` (a pure function of the key)."""
    return self._sample_text(np.random.default_rng(list(key)).random(self._num_uniforms).tolist())


def distinct_n(texts: Sequence[str], n: int) -> float:
  """Distinct n-grams / total n-grams over `texts` (1.0 = no repetition; 0 if none)."""
  grams = [t[i:i + n] for t in texts for i in range(len(t) - n + 1)]
  return len(set(grams)) / len(grams) if grams else 0.0


def empirical_entropy(texts: Sequence[str]) -> float:
  """Plug-in entropy (nats) of the empirical distribution of `texts` (e.g. sampled
  continuations of one prompt); log(len(texts)) when all differ, 0 when all agree."""
  counts = np.array(list(Counter(texts).values()), np.float64)
  p = counts / counts.sum()
  return float(-(p * np.log(p)).sum()) if len(texts) else 0.0


class HMMTask:
  """Prompt = the first `prompt_symbols` symbols of a sampled text, completion = the rest.

  Example i of a split is the text drawn from the stream (seed, split, i); texts end by
  the language's own end mark (at most max_len symbols), so completions are never cut.
  Train and eval are independent samples of one distribution (they may share texts).
  """

  name = 'hmm'
  splits = ('train', 'eval')
  # No `score`: there is no task metric; models are compared to the truth instead.

  def __init__(self, seed: int = 0, language_seed: int = 0, prompt_symbols: int = 4,
               train_size: int = 2**20, eval_size: int = 512, **language_kwargs):
    self.language = HMMLanguage.random(language_seed, **language_kwargs)
    if not 0 <= prompt_symbols <= self.language.min_len:
      raise ValueError(f'prompt_symbols must be in [0, min_len={self.language.min_len}] so '
                       f'every text has a full prompt, got {prompt_symbols}')
    if train_size < 1 or eval_size < 1:
      raise ValueError(f'split sizes must be >= 1, got {train_size}, {eval_size}')
    self.seed, self.prompt_symbols = seed, prompt_symbols
    self._sizes = {'train': train_size, 'eval': eval_size}
    self.max_prompt_chars = prompt_symbols
    self.max_completion_chars = self.language.max_len - prompt_symbols

  def num_examples(self, split: str) -> int:
    if split not in self._sizes:
      raise ValueError(f'unknown split {split!r}; valid: {self.splits}')
    return self._sizes[split]

  def example(self, split: str, index: int) -> tuple[str, str]:
    n = self.num_examples(split)
    if not 0 <= index < n:
      raise IndexError(f'{split} example {index} out of range [0, {n})')
    text = self.language.sample_text((self.seed, self.splits.index(split), index))
    return text[:self.prompt_symbols], text[self.prompt_symbols:]

  def next_token_logprobs(self, tokens_BxT: np.ndarray, input_mask_BxT: np.ndarray) -> np.ndarray:
    """The true next-token log-distribution after every prefix of pipeline rows (see
    HMMLanguage.next_token_logprobs); the text starts after BOS, so prompt included."""
    return self.language.next_token_logprobs(tokens_BxT, input_mask_BxT)

  def __repr__(self) -> str:
    return f'HMMTask(seed={self.seed}, prompt_symbols={self.prompt_symbols})'
