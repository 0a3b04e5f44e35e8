"""Losses between a teacher and a student that tokenize text differently.

Two losses, both pure functions of fp32 logits and explicit masks:

ULD, Universal Logit Distillation (Boizard et al., 2024): at an aligned position, sort each
model's next-token probabilities in decreasing order, pad the shorter vocabulary with zeros,
and take the L1 distance between the two sorted vectors,

    uld_t = Σ_i | sort↓(q_t)_i − sort↓(p_t)_i |

(the closed-form Wasserstein-1 distance under a uniform transport cost, as the paper derives).
A teacher known only by its top-k (a server's) has the top-k form `uld_topk`: its k largest
probabilities and the tail mass as one more entry, sorted (exact at k = V − 1).
No vocabulary alignment is needed; token identity is ignored. Positions are aligned by order
among the completion tokens, as in the paper's code: the k-th completion target of the
student with the k-th of the teacher, for k below the shorter completion's length.

Span losses in the spirit of GOLD (TRL's cross-tokenizer GKD): the completion is cut into the
text spans both tokenizations share (distill.data.cross_tokenizer). On a span, summing the
log-probabilities of a model's tokens gives the log-probability of the span's text given the
same preceding text, so the two models' span probabilities P_T (teacher) and P_S (student)
are directly comparable. Per span:

    span term   KL(Bernoulli(P_T) ‖ Bernoulli(P_S))
                = P_T·log(P_T/P_S) + (1−P_T)·log((1−P_T)/(1−P_S))
                (probabilities clipped to 1 − 1e-6, so that a certain span stays finite)
    vocab term  any divergence of the registry between the two models' next-token
                distributions at the span's first position, restricted to the tokens whose
                text is the same in both vocabularies and renormalised there (the
                vocabulary-mapping part of GOLD's hybrid loss)

At a span's first position both models condition on exactly the same text.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Span probabilities are clipped to 1 − SPAN_EPS: the complement's log stays finite.
SPAN_EPS = 1e-6


def sorted_probs(logits_NxV, valid_N, temperature: float = 1.0):
  """Softmax(logits/τ) sorted in decreasing order; masked rows see zero logits (no NaN)."""
  logits = jnp.where(valid_N[..., None], logits_NxV.astype(jnp.float32) / temperature, 0.0)
  return -jnp.sort(-jax.nn.softmax(logits, axis=-1), axis=-1)


def uld(student_logits_NxVs, teacher_logits_NxVt, mask_N, *, temperature: float = 1.0):
  """Σ_i |sort↓(q)_i − sort↓(p)_i| per position, the shorter vocabulary padded with zeros.

  Any leading shape; the vocabularies may differ in size. 0 where mask_N is 0.
  """
  _check_leading_axes(student_logits_NxVs, teacher_logits_NxVt, mask_N, 'teacher logits')
  valid = mask_N != 0
  q, p = (sorted_probs(x, valid, temperature) for x in (student_logits_NxVs, teacher_logits_NxVt))
  return _sorted_l1(q, p, valid)


def _check_leading_axes(student_NxVs, teacher_NxW, mask_N, teacher_name: str) -> None:
  if student_NxVs.shape[:-1] != teacher_NxW.shape[:-1] or mask_N.shape != student_NxVs.shape[:-1]:
    raise ValueError(f'student logits {student_NxVs.shape}, {teacher_name} {teacher_NxW.shape} '
                     f'and mask {mask_N.shape} must share every axis but the last')


def _sorted_l1(q_sorted, p_sorted, valid):
  """Σ_i |q_i − p_i| of two sorted vectors, the shorter padded with zeros; 0 where not valid."""
  width = max(q_sorted.shape[-1], p_sorted.shape[-1])
  pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])
  return jnp.where(valid, jnp.abs(pad(q_sorted) - pad(p_sorted)).sum(-1), 0.0)


def uld_topk(student_logits_NxVs, teacher_topk_logprobs_NxK, mask_N, *,
             temperature: float = 1.0):
  """ULD against a teacher known only by its k largest log-probs (a served teacher's, at
  temperature 1): its outcomes are those k tokens and the rest of the vocabulary as one
  (the tail mass 1 − Σ top-k, clipped at 0), sorted, against the student's sorted
  softmax(logits/τ). At k = V_teacher − 1 the tail is the last token's probability and this
  is `uld` exactly; below, the tail entry stands for the tokens the server did not return.
  """
  _check_leading_axes(student_logits_NxVs, teacher_topk_logprobs_NxK, mask_N, 'teacher top-k')
  valid = mask_N != 0
  q = sorted_probs(student_logits_NxVs, valid, temperature)
  top_NxK = jnp.where(valid[..., None], jnp.exp(teacher_topk_logprobs_NxK.astype(jnp.float32)),
                      0.0)
  tail_Nx1 = jnp.clip(1.0 - top_NxK.sum(-1, keepdims=True), 0.0, 1.0)
  p = -jnp.sort(-jnp.concatenate([top_NxK, tail_Nx1], axis=-1), axis=-1)
  return _sorted_l1(q, p, valid)


def target_logprobs(logits_BxTxV, targets_BxT, valid_BxT):
  """log softmax(logits)[target] per position (τ = 1: the probability of the text); 0 where
  not valid."""
  logits = jnp.where(valid_BxT[..., None], logits_BxTxV.astype(jnp.float32), 0.0)
  log_q = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_q, jnp.where(valid_BxT, targets_BxT, 0)[..., None], -1)
  return jnp.where(valid_BxT, picked[..., 0], 0.0)


def span_sums(values_BxT, span_ids_BxT, num_spans: int):
  """[B, S]: Σ of values over each span's positions (span ids −1 count nowhere)."""
  ids = jnp.where(span_ids_BxT >= 0, span_ids_BxT, num_spans)   # out of range: dropped
  return jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, num_segments=num_spans))(
      values_BxT, ids)


def span_starts(span_ids_BxT, num_spans: int):
  """[B, S]: the first column of each span (T where a row has no such span)."""
  columns_BxT = jnp.broadcast_to(jnp.arange(span_ids_BxT.shape[1]), span_ids_BxT.shape)
  ids = jnp.where(span_ids_BxT >= 0, span_ids_BxT, num_spans)
  first = jax.vmap(lambda c, i: jax.ops.segment_min(c, i, num_segments=num_spans))(
      columns_BxT, ids)
  return jnp.minimum(first, span_ids_BxT.shape[1])


def _log1m_exp(log_p):
  """log(1 − exp(log_p)) for log_p ≤ log(1 − SPAN_EPS), stable on both sides of log 2."""
  return jnp.where(log_p > -jnp.log(2.0), jnp.log(-jnp.expm1(log_p)),
                   jnp.log1p(-jnp.exp(log_p)))


def span_kl(teacher_log_p, student_log_p):
  """KL(Bernoulli(P_T) ‖ Bernoulli(P_S)) from log P_T, log P_S (any shape), clipped at
  1 − SPAN_EPS."""
  top = jnp.log1p(-SPAN_EPS)
  lt, ls = jnp.minimum(teacher_log_p, top), jnp.minimum(student_log_p, top)
  return jnp.exp(lt) * (lt - ls) + -jnp.expm1(lt) * (_log1m_exp(lt) - _log1m_exp(ls))


def at_columns(x_BxTx, columns_BxS):
  """x at each row's columns: [B, S, ...] (columns past the end read the last column)."""
  columns = jnp.minimum(columns_BxS, x_BxTx.shape[1] - 1)
  return jnp.take_along_axis(x_BxTx, columns.reshape(*columns.shape, *[1] * (x_BxTx.ndim - 2)),
                             axis=1)


def span_terms(student_logits_BxTxVs, teacher_logits_BxTxVt, rows: dict, *, num_spans: int,
               vocab_divergence=None, student_ids_K=None, teacher_ids_K=None,
               teacher_logprobs_BxT=None):
  """Per span [B, S]: (span term, vocab term or None, mask of spans both sides have,
  first student column of each span).

  rows: the batch fields of distill.data.pipeline.teacher_fields (targets, teacher_targets,
  span_ids, teacher_span_ids). vocab_divergence: fn(student_BxSxK, teacher_BxSxK, mask_BxS)
  (distill.losses.get) over the shared tokens student_ids_K ↔ teacher_ids_K.
  teacher_logprobs_BxT: the teacher's log p(teacher target) per column in place of its logits
  (a served teacher's; teacher_logits_BxTxVt is then None and the vocab term cannot be had).
  """
  own, other = rows['span_ids'], rows['teacher_span_ids']
  log_s = span_sums(target_logprobs(student_logits_BxTxVs, rows['targets'], own >= 0),
                    own, num_spans)
  if teacher_logprobs_BxT is None:
    teacher_logprobs_BxT = target_logprobs(teacher_logits_BxTxVt, rows['teacher_targets'],
                                           other >= 0)
  log_t = span_sums(jnp.where(other >= 0, teacher_logprobs_BxT, 0.0), other, num_spans)
  starts_s, starts_t = span_starts(own, num_spans), span_starts(other, num_spans)
  width = own.shape[1]
  mask = (starts_s < width) & (starts_t < width)
  spans = jnp.where(mask, span_kl(log_t, log_s), 0.0)
  if vocab_divergence is None:
    return spans, None, mask, starts_s
  if teacher_logits_BxTxVt is None:
    raise ValueError('the vocab term needs the teacher\'s logits, not only teacher_logprobs_BxT')
  student_K = at_columns(student_logits_BxTxVs, starts_s)[..., student_ids_K]
  teacher_K = at_columns(teacher_logits_BxTxVt, starts_t)[..., teacher_ids_K]
  return spans, vocab_divergence(student_K, teacher_K, mask), mask, starts_s
