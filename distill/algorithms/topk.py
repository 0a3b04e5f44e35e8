"""Sparse (top-k) KD: the teacher's top-k from a cache on disk, or computed in the step.

Rows:
  TeacherTopKCache  one pass of the teacher over `num_rows` train examples writes their
                    top-k ids and log-probs (completion positions) to a cache
                    (distill.algorithms.cache_rows); training reads rows from it and never
                    runs the teacher. The trainer still loads the teacher: its parameters
                    identify the cache (fingerprint) and held-out evaluation reports
                    teacher–student KL with it.
  OnlineTopK        dataset rows with the same top-k taken from the teacher inside the step
                    (the reference the cache must reproduce).
Objective:
  TopKForwardKL     per completion token, from config.loss (divergence must be forward_kl):
                        kd_weight·[τ²]·KL_topk(p_τ‖q_τ) + ce_weight·CE(q, target)
                    with KL_topk = losses.topk_forward_kl (tail 'bucket' or 'ignore', see
                    distill.losses.topk); config.loss.chunk_size > 0 computes it a chunk of
                    tokens at a time (memory flat in B·T·V).

kwargs: k (default 16), tail ('bucket'); for the cache also num_rows (train examples
cached; 4096), logprob_dtype ('float32' or 'float16'), rows_per_shard, batch_size, cache_dir.
Metric: topk_mass, the teacher probability its top-k hold (token mean).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from distill import losses
from distill.algorithms import hooks
from distill.algorithms.cache_rows import CACHE_DEFAULTS, CacheRows
from distill.algorithms.hooks import ROW_KEYS
from distill.losses.topk import TAILS
from distill.models.layers import softcap

TOPK_FIELDS = ('topk_ids', 'topk_logprobs')


def teacher_topk(graphdef, params, batch, k: int, temperature: float):
  """(ids [B,T,k] int32, log-probs [B,T,k] fp32) of the teacher; zeros off the loss mask."""
  logits = nnx.merge(graphdef, jax.lax.stop_gradient(params))(batch['tokens'],
                                                              batch['input_mask'])
  ids, logprobs = losses.teacher_topk(logits, k, temperature=temperature)
  keep = (batch['loss_mask'] != 0)[..., None]
  return jnp.where(keep, ids, 0), jnp.where(keep, logprobs, 0.0)


def check_k(hook: hooks.Hook) -> int:
  vocab = hook.run.model_config.vocab_size
  if hook.positive_int('k') > vocab:
    raise hook.kwarg_error('k', f'must be at most the vocabulary size {vocab}, got '
                           f'{hook.options["k"]}')
  return hook.options['k']


class OnlineTopK(hooks.Rows):
  """Dataset rows and the teacher's top-k of them, computed inside the step."""
  DEFAULTS = {'k': 16}
  needs_teacher = True
  fields = ROW_KEYS + TOPK_FIELDS

  def check(self) -> None:
    check_k(self)

  def draw(self, ctx, inputs, batch):
    ids, logprobs = teacher_topk(ctx.teacher_graphdef, inputs.teacher_params, batch,
                                 self.options['k'], self.config.loss.temperature)
    rows = {**{k: batch[k] for k in ROW_KEYS}, 'topk_ids': ids, 'topk_logprobs': logprobs}
    return hooks.Drawn(rows, inputs.state, {})


class TeacherTopKCache(CacheRows):
  """The teacher's top-k of `num_rows` train examples, cached once."""
  DEFAULTS = {'k': 16, 'num_rows': 4096, 'logprob_dtype': 'float32', **CACHE_DEFAULTS}
  KIND, LABEL, CACHE_SUBDIR = 'teacher_topk', 'teacher cache', 'teacher_cache'
  fields = ROW_KEYS + TOPK_FIELDS

  def num_rows(self) -> int:
    return self.positive_int('num_rows')

  def check(self) -> None:
    check_k(self)
    if self.options['logprob_dtype'] not in ('float32', 'float16'):
      raise self.kwarg_error('logprob_dtype', 'must be float32 or float16, got '
                             f'{self.options["logprob_dtype"]!r}')
    super().check()

  def identity_settings(self) -> dict:
    return {'k': self.options['k'], 'temperature': self.config.loss.temperature,
            'logprob_dtype': self.options['logprob_dtype']}

  def compute(self, teacher_params, batch, first_row):
    del first_row
    ids, logprobs = teacher_topk(self.run.teacher_graphdef, teacher_params, batch,
                                 self.options['k'], self.config.loss.temperature)
    return {**{k: batch[k] for k in ROW_KEYS}, 'topk_ids': ids,
            'topk_logprobs': logprobs.astype(self.options['logprob_dtype'])}


class TopKForwardKL(hooks.Objective):
  """Forward KL over the teacher's top-k (+ CE), from the rows' topk fields."""
  DEFAULTS = {'tail': 'bucket'}
  accepts = ('forward_kl',)
  needs_fields = ROW_KEYS + TOPK_FIELDS

  def check(self) -> None:
    loss = self.config.loss
    if loss.kd_weight == 0:
      raise ValueError(f'config.loss.kd_weight is 0: {self.config.algorithm.name} would not use '
                       'the teacher; train with algorithm supervised instead')
    if self.options['tail'] not in TAILS:
      raise self.kwarg_error('tail', f'must be one of {TAILS}, got {self.options["tail"]!r}')
    tau, tail = loss.temperature, self.options['tail']
    kd_scale = loss.kd_weight * (tau**2 if loss.temperature_squared_scale else 1.0)

    def token_fn(logits_NxV, ids_NxK, logprobs_NxK, targets_N, mask_N):
      per_token = kd_scale * losses.topk_forward_kl(logits_NxV, ids_NxK, logprobs_NxK, mask_N,
                                                    tail=tail, temperature=tau)
      if loss.ce_weight:
        per_token += loss.ce_weight * losses.cross_entropy(logits_NxV, targets_N, mask_N)
      return per_token

    self.token_fn = token_fn

  def loss(self, ctx, params, trainable, prepared, drawn, state):
    del trainable, prepared, state
    batch = drawn.rows
    ids, logprobs = batch['topk_ids'], batch['topk_logprobs']
    weights_BxT, normaliser = losses.token_weights(batch['loss_mask'], ctx.reduction)
    h, w = hooks.model_outputs(ctx.student_graphdef, params, batch)
    token_fn = self.token_fn
    if ctx.student_softcap:   # the student's logits as its own forward pass caps them
      token_fn = lambda logits, *rest: self.token_fn(softcap(logits, ctx.student_softcap), *rest)
    total = losses.topk_loss(h, w, ids, logprobs, batch['targets'], weights_BxT, token_fn,
                             ctx.chunk_size)
    mask = batch['loss_mask'] != 0
    mass = jnp.where(mask, jnp.exp(logprobs.astype(jnp.float32)).sum(-1), 0.0).sum()
    tokens = mask.sum().astype(jnp.float32)
    metrics = {'loss': (total, normaliser), 'tokens': (tokens, jnp.float32(1.0)),
               'topk_mass': (mass, tokens)}
    return total / jnp.maximum(normaliser, 1e-9), metrics
