"""Sparse (top-k) KD: forward KL against a teacher known only on its k most likely ids.

The teacher arrives as (topk_ids_BxTxK int32, topk_logprobs_BxTxK fp32) — log-probabilities
under the teacher's *full* distribution, so Σ exp(logprobs) ≤ 1 and the rest is the mass the
cache dropped. `teacher_topk` extracts this pair from full logits with `lax.top_k`, so the
offline (cached) and online paths share the same loss code. The dropped mass is handled
explicitly:

  tail='bucket': the k ids plus one extra outcome "any other id": the teacher's remaining
                 mass P = 1 − Σ p_k against the student's mass Q outside those ids,
                     Σ_k p_k·log(p_k/q_k) + P·log(P/Q).
                 A true KL between two (k+1)-outcome distributions; at k = V it is exactly
                 the full forward KL.
  tail='ignore': the teacher renormalised over its top-k, p̂ = p_k / Σ p_k, against the
                 student's full-vocabulary log-probabilities at those ids,
                     Σ_k p̂_k·log(p̂_k/q_k)  (= KL(p̂‖q̂) − log Σ q_k ≥ 0),
                 so mass the student puts outside the top-k is also penalised.

Ids must be distinct within a position (as `lax.top_k` returns them).

`topk_loss` is the weighted token sum of such a loss straight from the student's final
hidden states, plain or through the chunked loss's scan (`chunked.chunk_scan`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from distill.losses import chunked, divergences

TAILS = ('bucket', 'ignore')


def _check_k(k: int, vocab: int):
  if not 1 <= k <= vocab:
    raise ValueError(f'top-k needs 1 <= k <= vocabulary size {vocab}, got k={k}')


def teacher_topk(teacher_logits_BxTxV, k: int, *, temperature: float = 1.0):
  """(ids [..., k] int32, full-distribution log-probs [..., k] fp32) of the teacher's top k."""
  _check_k(k, teacher_logits_BxTxV.shape[-1])
  if temperature <= 0:
    raise ValueError(f'temperature must be > 0, got {temperature}')
  log_p = jax.nn.log_softmax(teacher_logits_BxTxV.astype(jnp.float32) / temperature, axis=-1)
  logprobs, ids = jax.lax.top_k(log_p, k)
  return ids.astype(jnp.int32), logprobs


def _log1mexp(log_x):
  """log(1 − exp(log_x)) for log_x ≤ 0 (−inf at 0); rounding above 0 is clipped to 0."""
  log_x = jnp.minimum(log_x, 0.0)
  safe = jnp.where(log_x < 0.0, log_x, -1.0)
  out = jnp.where(safe > -0.6931472, jnp.log(-jnp.expm1(safe)), jnp.log1p(-jnp.exp(safe)))
  return jnp.where(log_x < 0.0, out, -jnp.inf)


def topk_forward_kl(student_logits_BxTxV, topk_ids_BxTxK, topk_logprobs_BxTxK, mask_BxT,
                    *, tail: str = 'bucket', temperature: float = 1.0):
  """Per-token forward KL over the teacher's top-k, [B, T]; 0 where mask is 0.

  `temperature` divides the student's logits (the teacher's log-probs are used as given:
  extract them with the same temperature).
  """
  if tail not in TAILS:
    raise ValueError(f'tail must be one of {TAILS}, got {tail!r}')
  if temperature <= 0:
    raise ValueError(f'temperature must be > 0, got {temperature}')
  vocab, k = student_logits_BxTxV.shape[-1], topk_ids_BxTxK.shape[-1]
  _check_k(k, vocab)
  if topk_ids_BxTxK.shape != topk_logprobs_BxTxK.shape:
    raise ValueError(f'top-k ids {topk_ids_BxTxK.shape} and log-probs '
                     f'{topk_logprobs_BxTxK.shape} differ in shape')
  if topk_ids_BxTxK.shape[:-1] != student_logits_BxTxV.shape[:-1]:
    raise ValueError(f'top-k shape {topk_ids_BxTxK.shape} does not match student logits '
                     f'{student_logits_BxTxV.shape}')
  if mask_BxT.shape != student_logits_BxTxV.shape[:-1]:
    raise ValueError(f'mask shape {mask_BxT.shape} does not match logits '
                     f'{student_logits_BxTxV.shape}')
  valid = mask_BxT != 0
  logits = jnp.where(valid[..., None], student_logits_BxTxV.astype(jnp.float32) / temperature,
                     0.0)
  ids = jnp.where(valid[..., None], topk_ids_BxTxK, 0)
  log_p = jnp.where(valid[..., None], topk_logprobs_BxTxK.astype(jnp.float32), 0.0)
  log_q_all = jax.nn.log_softmax(logits, axis=-1)
  log_q = jnp.take_along_axis(log_q_all, ids, axis=-1)

  if tail == 'ignore':
    log_p_hat = log_p - jax.nn.logsumexp(log_p, axis=-1, keepdims=True)
    kl = divergences.kl_from_logprobs(log_p_hat, log_q)
  else:
    log_p_tail = _log1mexp(jax.nn.logsumexp(log_p, axis=-1))
    # The student's tail mass from the logits outside the ids (exact, not 1 − Σ q_k).
    rows = jnp.arange(ids.size // k)[:, None]
    in_topk = jnp.zeros((rows.shape[0], vocab), bool).at[rows, ids.reshape(-1, k)].set(True)
    in_topk = in_topk.reshape(logits.shape)
    outside = ~in_topk & (logits > -jnp.inf)
    has_tail = outside.any(axis=-1)
    # Rows without a tail get zeros instead of all −inf, keeping logsumexp's gradient finite.
    tail_logits = jnp.where(has_tail[..., None], jnp.where(outside, logits, -jnp.inf), 0.0)
    log_q_tail = jnp.where(has_tail, jax.nn.logsumexp(tail_logits, axis=-1)
                           - jax.nn.logsumexp(logits, axis=-1), -jnp.inf)
    kl = divergences.kl_from_logprobs(
        jnp.concatenate([log_p, log_p_tail[..., None]], axis=-1),
        jnp.concatenate([log_q, log_q_tail[..., None]], axis=-1))
  return jnp.where(valid, kl, 0.0)


def topk_loss(student_h_BxTxD, student_w_DxV, ids_BxTxK, logprobs_BxTxK, targets_BxT,
              weights_BxT, token_fn, chunk_size: int = 0):
  """Σ weights·token_fn(student logits, ids, logprobs, targets, mask) over tokens.

  token_fn(logits_NxV, ids_NxK, logprobs_NxK, targets_N, mask_N) -> per-token loss [N]
  (e.g. `topk_forward_kl` plus cross-entropy); mask is weights != 0. chunk_size > 0: at most
  chunk_size tokens' [chunk, V] logits exist at a time (`chunked.chunk_scan`), with the same
  value and gradient as chunk_size = 0. The gradient reaches student_h and student_w only.
  """
  B, T, D = student_h_BxTxD.shape
  K = ids_BxTxK.shape[-1]
  if ids_BxTxK.shape != (B, T, K) or logprobs_BxTxK.shape != (B, T, K):
    raise ValueError(f'top-k ids {ids_BxTxK.shape} and log-probs {logprobs_BxTxK.shape} must '
                     f'be [{B}, {T}, K] like the student hidden states {student_h_BxTxD.shape}')
  if targets_BxT.shape != (B, T) or weights_BxT.shape != (B, T):
    raise ValueError(f'targets {targets_BxT.shape} and weights {weights_BxT.shape} must be '
                     f'{(B, T)}')
  h_NxD = student_h_BxTxD.reshape(B * T, D)
  per_token = jax.lax.stop_gradient((ids_BxTxK.reshape(B * T, K),
                                     logprobs_BxTxK.reshape(B * T, K), targets_BxT.reshape(-1)))
  weights_N = jax.lax.stop_gradient(weights_BxT.reshape(-1).astype(jnp.float32))

  def weighted_sum(h_CxD, w_DxV, shared, per_token, weights_C):
    del shared   # the teacher is all in the per-token inputs
    ids_CxK, logprobs_CxK, targets_C = per_token
    loss_C = token_fn(chunked.logits_from_hidden(h_CxD, w_DxV), ids_CxK, logprobs_CxK, targets_C,
                      weights_C != 0)
    return jnp.sum(jnp.where(weights_C != 0, weights_C * loss_C, 0.0))

  if not chunk_size:
    return weighted_sum(h_NxD, student_w_DxV, None, per_token, weights_N)
  return chunked.chunk_scan(weighted_sum, h_NxD, student_w_DxV, None, per_token, weights_N,
                            chunk_size)
