"""The default objective: config.loss (a divergence to the teacher mixed with CE) per token.

    loss = Σ_t w_t · [kd_weight·[τ²]·D_τ(p_t, q_t) + ce_weight·CE(q_t, target_t)] / Σ_t w_t

with w the token weights of config.loss.reduction over the rows' loss mask, through the
chunked loss when config.loss.chunk_size > 0 (no [B, T, V] logits) and the plain one
otherwise. Without a teacher it is cross-entropy on the rows' targets.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from absl import logging

from distill import losses
from distill.algorithms import hooks


def make_token_fn(config, has_teacher: bool):
  """config.loss as a per-token objective (CE alone when there is no teacher)."""
  loss = config.loss
  kd_weight = loss.kd_weight if has_teacher else 0.0
  ce_weight = loss.ce_weight if has_teacher else 1.0
  hparams, unused = losses.divergences.split_hparams(loss.divergence, dict(loss.hparams))
  if unused:
    logging.warning('loss.hparams %s are not used by divergence %r', unused, loss.divergence)
  return losses.token_objective(
      loss.divergence, kd_weight=kd_weight, ce_weight=ce_weight, temperature=loss.temperature,
      temperature_squared_scale=loss.temperature_squared_scale, **hparams)


def weighted_loss(ctx, student_h, student_w, teacher_h, teacher_w, targets_BxT, weights_BxT,
                  token_fn):
  """Σ weights·token_fn(student, teacher, targets), chunked when ctx.chunk_size > 0.

  Weights are constants (any sign); the gradient reaches the student's hidden states and
  output projection only.
  """
  weights_BxT = jax.lax.stop_gradient(weights_BxT)
  token_fn = hooks.capped(token_fn, ctx)
  if ctx.chunk_size:
    total, _ = losses.chunked_loss(student_h, student_w, teacher_h, teacher_w, targets_BxT,
                                   weights_BxT, token_fn, chunk_size=ctx.chunk_size)
  else:
    total, _ = losses.plain_loss(student_h, student_w, teacher_h, teacher_w, targets_BxT,
                                 weights_BxT, token_fn)
  return total


def teacher_outputs(ctx, teacher_params, rows):
  """The teacher's final hidden states and output projection, constants for the gradient."""
  if ctx.teacher_graphdef is None:
    return None, None
  return jax.tree.map(jax.lax.stop_gradient,
                      hooks.model_outputs(ctx.teacher_graphdef, teacher_params, rows))


def token_loss(ctx, student_h, student_w, teacher_h, teacher_w, rows, token_fn):
  """(Σ w·ℓ / Σ w, metrics) of a token_fn over the rows' loss mask."""
  weights_BxT, normaliser = losses.token_weights(rows['loss_mask'], ctx.reduction)
  loss_sum = weighted_loss(ctx, student_h, student_w, teacher_h, teacher_w, rows['targets'],
                           weights_BxT, token_fn)
  metrics = {'loss': (loss_sum, normaliser),
             'tokens': (rows['loss_mask'].sum(), jnp.float32(1.0))}
  return loss_sum / jnp.maximum(normaliser, 1e-9), metrics


class Divergence(hooks.Objective):
  """config.loss on the rows: any divergence of the registry (distill.losses)."""
  needs_teacher = False   # CE alone without one; config validation refuses kd_weight > 0

  def loss(self, ctx, params, trainable, prepared, drawn, state):
    del trainable
    rows = drawn.rows
    student_h, student_w = hooks.model_outputs(ctx.student_graphdef, params, rows)
    teacher_h, teacher_w = teacher_outputs(ctx, prepared, rows)
    return token_loss(ctx, student_h, student_w, teacher_h, teacher_w, rows,
                      self.token_fn(ctx, state))

  def token_fn(self, ctx, state):
    """The per-token function; subclasses may build it from their state (e.g. TAID)."""
    del state
    return ctx.token_fn
