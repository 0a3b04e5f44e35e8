"""The served teacher's device work: one model, jitted scoring and generation at bucketed shapes.

Scoring is a forward pass over right-padded token rows that returns, per position, the top-k
ids and log-probabilities of the next token and the log-prob and rank of the token that
actually follows (vLLM's `prompt_logprobs`). Generation is distill.sampling.generate over
left-padded prompts, then a scoring pass over prompt + completion for the completion's
log-probabilities. Log-probabilities are the model's own (temperature 1, no top-k/top-p), as
vLLM reports them by default, whatever the sampling parameters.

Batch and length are rounded up to buckets (powers of two rows, multiples of LENGTH_BUCKET
tokens) so a server compiles a handful of shapes, not one per request. One lock serialises
device work. With batch_wait_ms > 0, scoring requests that arrive within that many
milliseconds of each other share one forward pass (distill.serve.batcher).
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from distill import sampling
from distill.data import teacher_cache
from distill.data.hf_tokenizer import HFTokenizer
from distill.data.tokenizer import CharTokenizer
from distill.parallel import mesh as mesh_lib
from distill.serve.batcher import ScoreBatcher
from distill.train import teacher as teacher_lib

LENGTH_BUCKET = 32


def _bucket_rows(n: int, limit: int) -> int:
  return min(1 << max(n - 1, 0).bit_length(), max(limit, n))


def _bucket_length(n: int, limit: int) -> int:
  return min(-(-n // LENGTH_BUCKET) * LENGTH_BUCKET, limit)


def load_tokenizer(model_dir: str, tokenizer: str | None = None):
  """The tokenizer served with `model_dir`: `tokenizer` ('char' or an HF folder) if given, else
  the folder's tokenizer.json, else the one the run's config.json names ('' = CharTokenizer)."""
  if tokenizer:
    return CharTokenizer() if tokenizer == 'char' else HFTokenizer(tokenizer)
  if os.path.isfile(os.path.join(model_dir, 'tokenizer.json')):
    return HFTokenizer(model_dir)
  run_config = os.path.join(model_dir, 'config.json')
  name = None
  if teacher_lib.has_export(model_dir) and os.path.isfile(run_config):
    with open(run_config) as f:
      name = json.load(f).get('tokenizer')
  if name is None:
    raise ValueError(f'no tokenizer found for {model_dir!r} (no tokenizer.json, no run '
                     "config.json naming one): pass --tokenizer=HF_FOLDER or --tokenizer=char")
  return HFTokenizer(name) if name else CharTokenizer()


@dataclasses.dataclass(frozen=True)
class Scores:
  """Per prompt of n tokens, positions 1..n-1 (what predicts token i is position i-1)."""
  topk_ids: list[np.ndarray]         # [n-1, k] int32, best first
  topk_logprobs: list[np.ndarray]    # [n-1, k] fp32
  token_logprobs: list[np.ndarray]   # [n-1] fp32: log-prob of the token that follows
  token_ranks: list[np.ndarray]      # [n-1] int32: 1 + ids more likely than it


class Engine:
  """A loaded teacher and its jitted functions (one device: a server process per chip)."""

  def __init__(self, model_dir: str, *, tokenizer: str | None = None, max_batch_size: int = 64,
               batch_wait_ms: float = 0.0):
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({'data': 1, 'fsdp': 1, 'tensor': 1}),
                              devices=jax.devices()[:1])
    self.graphdef, self.params, self.model_config = teacher_lib.load_exported(model_dir, mesh)
    self.tokenizer = load_tokenizer(model_dir, tokenizer)
    if self.model_config.vocab_size < self.tokenizer.vocab_size:
      raise ValueError(f'{model_dir}: model vocabulary {self.model_config.vocab_size} is smaller '
                       f'than its tokenizer\'s {self.tokenizer.vocab_size}')
    self.max_batch_size = max_batch_size
    self.max_model_len = self.model_config.max_seq_len
    self.fingerprint = teacher_cache.fingerprint_model(self.model_config, self.params)
    self.tokenizer_fingerprint = self.tokenizer.fingerprint()
    # Each id's text, decoded once: responses name every top-k entry's token.
    self.token_text = [self.tokenizer.decode([i]) if i < self.tokenizer.vocab_size else ''
                       for i in range(self.model_config.vocab_size)]
    self.lock = threading.Lock()
    self._score = jax.jit(self._score_fn, static_argnames='k')
    self._generate = {}   # SamplingConfig -> jitted generate
    self.batcher = (ScoreBatcher(self._score_now, max_rows=max_batch_size,
                                 wait_s=batch_wait_ms / 1000) if batch_wait_ms > 0 else None)

  # ---------------------------------------------------------------- scoring

  def _score_fn(self, params, tokens_BxT, mask_BxT, k: int):
    logits = nnx.merge(self.graphdef, params)(tokens_BxT, mask_BxT)
    logp_BxTxV = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[:, :-1]
    top_lp, top_ids = jax.lax.top_k(logp_BxTxV, k)
    token_lp = jnp.take_along_axis(logp_BxTxV, tokens_BxT[:, 1:, None], axis=-1)
    rank = 1 + jnp.sum(logp_BxTxV > token_lp, axis=-1)
    return top_ids.astype(jnp.int32), top_lp, token_lp[..., 0], rank.astype(jnp.int32)

  def score(self, prompts: list[list[int]], k: int) -> Scores:
    """Top-k (k >= 1) of every position of every prompt (each at least 1 token long); with
    batching, in one forward pass with the other requests of the moment."""
    if self.batcher is not None:
      return self.batcher.score(prompts, k)
    return self._score_now(prompts, k)

  def _score_now(self, prompts: list[list[int]], k: int) -> Scores:
    out = Scores([], [], [], [])
    for first in range(0, len(prompts), self.max_batch_size):
      chunk = prompts[first:first + self.max_batch_size]
      B = _bucket_rows(len(chunk), self.max_batch_size)
      T = _bucket_length(max(len(p) for p in chunk) + 1, self.max_model_len)
      tokens = np.zeros((B, T), np.int32)
      mask = np.zeros((B, T), np.int32)
      for row, prompt in enumerate(chunk):
        tokens[row, :len(prompt)], mask[row, :len(prompt)] = prompt, 1
      with self.lock:
        results = jax.device_get(self._score(self.params, tokens, mask, k=k))
      for row, prompt in enumerate(chunk):
        n = len(prompt) - 1
        for field, value in zip(dataclasses.fields(Scores), results):
          getattr(out, field.name).append(value[row, :n])
    return out

  # ---------------------------------------------------------------- generation

  def generate(self, prompts: list[list[int]], *, max_tokens: int, temperature: float,
               top_k: int, top_p: float, seed: int) -> list[list[int]]:
    """Completions (each up to and including EOS, at most max_tokens) of left-padded prompts."""
    completions = []
    rng = jax.random.PRNGKey(seed)
    for first in range(0, len(prompts), self.max_batch_size):
      chunk = prompts[first:first + self.max_batch_size]
      B = _bucket_rows(len(chunk), self.max_batch_size)
      P = _bucket_length(max(len(p) for p in chunk), self.max_model_len - max_tokens)
      tokens = np.full((B, P), self.tokenizer.pad_id, np.int32)
      mask = np.zeros((B, P), np.int32)
      for row, prompt in enumerate(chunk):
        tokens[row, P - len(prompt):], mask[row, P - len(prompt):] = prompt, 1
      cfg = sampling.SamplingConfig(max_new_tokens=max_tokens, temperature=temperature,
                                    top_k=top_k, top_p=top_p, eos_id=self.tokenizer.eos_id,
                                    pad_id=self.tokenizer.pad_id)
      if cfg not in self._generate:
        self._generate[cfg] = sampling.make_generate_fn(self.graphdef, cfg)
      with self.lock:
        out = jax.device_get(self._generate[cfg](self.params, tokens, mask,
                                                 jax.random.fold_in(rng, first)))
      for row in range(len(chunk)):
        completions.append(out['tokens_BxN'][row][out['mask_BxN'][row] != 0].tolist())
    return completions
