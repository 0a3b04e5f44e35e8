"""Distillation from a teacher with another tokenizer (algorithm 'cross_tokenizer').

    config.algorithm.name = 'cross_tokenizer'
    config.teacher.tokenizer = 'path/to/teacher_tokenizer'    # or 'char'
    config.algorithm.kwargs.loss = 'uld' | 'gold'

Rows: the dataset's rows, each also encoded with the teacher's tokenizer in the same layout
and lengths, with the text spans both tokenizations share (distill.data.pipeline.
teacher_fields). The teacher runs on its own ids inside the step.

Objective, per the `loss` kwarg (formulas in distill.losses.cross_tokenizer):
  uld   kd_weight·[τ²]·ULD + ce_weight·CE per student completion token. ULD compares the k-th
        completion position of both models (same column in the two layouts), for k below the
        shorter completion; through the chunked loss when config.loss.chunk_size > 0.
  gold  per shared span, span_weight·KL(Bernoulli(P_T)‖Bernoulli(P_S)) of the span text's
        probabilities + vocab_weight·config.loss.divergence (τ applies here) between the two
        next-token distributions at the span's start over the tokens whose text both
        vocabularies share; each span weighted like its first student token, plus ce_weight·CE.
        Holds both models' [B, T, V] logits (config.loss.chunk_size does not apply).
Both are normalised like every loss: Σ weights / the reduction's normaliser of the student's
completion tokens (config.loss.reduction). Metrics (gold): span_kl, vocab_divergence (means
per span), spans (per step).

kwargs: loss ('uld'), span_weight (1.0), vocab_weight (1.0; gold only).

With config.teacher.server the rows bring the served teacher's scores of its own rows and
the objective reads them instead of running the teacher (distill.algorithms.served.
ServedCrossTokenizer: the span term exactly, ULD in its top-k form, the vocab term refused).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from distill import losses
from distill.algorithms import hooks
from distill.algorithms.served_scoring import TEACHER_LOGPROBS
from distill.data import cross_tokenizer as alignment
from distill.losses import cross_tokenizer as xtok
from distill.losses.chunked import logits_from_hidden

LOSSES = ('uld', 'gold')
TEACHER_FIELDS = ('teacher_tokens', 'teacher_input_mask', 'teacher_loss_mask', 'teacher_targets',
                  'span_ids', 'teacher_span_ids')


class TeacherTokenRows(hooks.Rows):
  """The dataset's rows with the teacher's own ids and the shared spans."""
  needs_teacher = True
  fields = hooks.ROW_KEYS + TEACHER_FIELDS


class CrossTokenizer(hooks.Objective):
  """ULD or GOLD-style span losses to a teacher with another tokenizer."""
  DEFAULTS = {'loss': 'uld', 'span_weight': 1.0, 'vocab_weight': 1.0}
  needs_teacher = True
  needs_fields = hooks.ROW_KEYS + TEACHER_FIELDS

  def check(self) -> None:
    run, loss = self.run, self.config.loss
    if self.options['loss'] not in LOSSES:
      raise self.kwarg_error('loss', f'must be one of {list(LOSSES)}, got '
                             f'{self.options["loss"]!r}')
    if run.teacher_tokenizer is None:
      raise ValueError(f'algorithm {self.config.algorithm.name!r} needs the teacher\'s tokenizer: '
                       'set config.teacher.tokenizer')
    for name in ('span_weight', 'vocab_weight'):
      self.real_in(name, 0.0, float('inf'))
    self.vocab_sizes = (run.tokenizer.vocab_size, run.teacher_tokenizer.vocab_size)
    self.kd_scale = loss.kd_weight * (loss.temperature**2 if loss.temperature_squared_scale
                                      else 1.0)
    self.vocab_divergence = None
    if self.options['loss'] == 'gold' and self.options['vocab_weight']:
      hparams, _ = losses.divergences.split_hparams(loss.divergence, dict(loss.hparams))
      self.vocab_divergence = losses.get(loss.divergence, temperature=loss.temperature,
                                         **hparams)
      self.shared_ids = alignment.shared_vocabulary(run.tokenizer, run.teacher_tokenizer)
      if not len(self.shared_ids[0]):
        raise self.kwarg_error('vocab_weight', 'must be 0: no token has the same text in the '
                               'student\'s and the teacher\'s vocabularies')

  def loss(self, ctx, params, trainable, prepared, drawn, state):
    del trainable, state
    rows = drawn.rows
    student = hooks.model_outputs(ctx.student_graphdef, params, rows)
    weights_BxT, normaliser = losses.token_weights(rows['loss_mask'], ctx.reduction)
    form = self._uld if self.options['loss'] == 'uld' else self._gold
    loss_sum, metrics = form(ctx, student, self.teacher_outputs(ctx, prepared, rows), rows,
                             jax.lax.stop_gradient(weights_BxT))
    metrics = {'loss': (loss_sum, normaliser),
               'tokens': (rows['loss_mask'].sum(), jnp.float32(1.0)), **metrics}
    return loss_sum / jnp.maximum(normaliser, 1e-9), metrics

  def teacher_outputs(self, ctx, teacher_params, rows):
    """The teacher's (hidden states, output projection) on its own ids, run in the step."""
    teacher_rows = {'tokens': rows['teacher_tokens'], 'input_mask': rows['teacher_input_mask']}
    return jax.lax.stop_gradient(
        hooks.model_outputs(ctx.teacher_graphdef, teacher_params, teacher_rows))

  def _ce(self, student_logits, targets, weights):
    ce_weight = self.config.loss.ce_weight
    if not ce_weight:
      return 0.0
    return ce_weight * losses.cross_entropy(student_logits, targets, weights != 0)

  def _uld(self, ctx, student, teacher, rows, weights_BxT):
    """Σ w·(kd·ULD·[both completions] + ce·CE) over the student's completion tokens. teacher
    None: the teacher's top-k log-probs come in the rows (a served teacher's; uld_topk)."""
    student_h, student_w = student
    temperature = self.config.loss.temperature
    cap = hooks.capped(lambda s, t: (s, t), ctx)
    served = teacher is None
    teacher_in, teacher_w = (rows['topk_logprobs'], None) if served else teacher

    def weighted_sum(h, w, teacher_w, per_token, weights):
      teacher_in, targets, teacher_mask = per_token
      both = (weights != 0) & (teacher_mask != 0)
      if served:   # teacher_in: its top-k log-probs at this column
        s, _ = cap(logits_from_hidden(h, w, self.vocab_sizes[0]), None)
        per = xtok.uld_topk(s, teacher_in, both, temperature=temperature)
      else:        # teacher_in: its hidden states at this column
        s, t = cap(logits_from_hidden(h, w, self.vocab_sizes[0]),
                   logits_from_hidden(teacher_in, teacher_w, self.vocab_sizes[1]))
        per = xtok.uld(s, t, both, temperature=temperature)
      per = self.kd_scale * per + self._ce(s, targets, weights)
      return jnp.sum(jnp.where(weights != 0, weights * per, 0.0))

    flat = lambda x: x.reshape(-1, *x.shape[2:])
    per_token = (flat(teacher_in), flat(rows['targets']), flat(rows['teacher_loss_mask']))
    args = (flat(student_h), student_w, teacher_w, per_token, flat(weights_BxT))
    if ctx.chunk_size:
      return losses.chunk_scan(weighted_sum, *args, ctx.chunk_size), {}
    return weighted_sum(*args), {}

  def _gold(self, ctx, student, teacher, rows, weights_BxT):
    """Σ over shared spans (weighted like their first student token) + ce·CE. teacher None:
    the teacher's log-probs of its targets come in the rows (a served teacher's)."""
    def logits(h_BxTxD, w_DxV, vocab_size):
      flat = logits_from_hidden(h_BxTxD.reshape(-1, h_BxTxD.shape[-1]), w_DxV, vocab_size)
      return flat.reshape(*h_BxTxD.shape[:2], -1)

    s, t = hooks.capped(lambda s, t: (s, t), ctx)(
        logits(*student, self.vocab_sizes[0]),
        None if teacher is None else logits(*teacher, self.vocab_sizes[1]))
    mapping = {} if teacher is not None else {'teacher_logprobs_BxT': rows[TEACHER_LOGPROBS]}
    if self.vocab_divergence is not None:
      student_ids, teacher_ids = self.shared_ids
      mapping = dict(mapping, vocab_divergence=self.vocab_divergence,
                     student_ids_K=student_ids, teacher_ids_K=teacher_ids)
    span_kl, vocab, mask, starts = xtok.span_terms(s, t, rows, num_spans=s.shape[1], **mapping)
    per_span = self.options['span_weight'] * span_kl
    if vocab is not None:
      per_span = per_span + self.options['vocab_weight'] * vocab
    span_weights = jnp.where(mask, xtok.at_columns(weights_BxT, starts), 0.0)
    ce = self._ce(s, rows['targets'], weights_BxT)
    loss_sum = (self.kd_scale * jnp.sum(span_weights * per_span) +
                jnp.sum(jnp.where(weights_BxT != 0, weights_BxT * ce, 0.0)))
    spans = mask.sum().astype(jnp.float32)
    metrics = {'span_kl': (jnp.sum(span_kl), spans), 'spans': (spans, jnp.float32(1.0))}
    if vocab is not None:
      metrics['vocab_divergence'] = (jnp.sum(vocab), spans)
    return loss_sum, metrics
