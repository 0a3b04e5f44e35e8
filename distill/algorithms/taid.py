"""TAID's objective: KL to a target that moves from the student to the teacher (ICLR 2025).

    loss_t = kd_weight·KL(p_t ‖ q) + ce_weight·CE(q, target),
    p_t = softmax((1−t)·stopgrad(z_student) + t·z_teacher)

on any rows (the paper: the fixed dataset), through the chunked loss like every divergence
objective. t follows the paper's adaptive schedule (distill.losses.taid: a momentum of the
relative loss improvement pushes t up, a linear floor makes it reach t_end by the last step);
t and the schedule's momentum live in state['algo']['objective'], so a resumed run continues
the schedule exactly. config.loss.divergence must be forward_kl (TAID's target replaces the
teacher in it) and temperature 1.

kwargs: t_start (0.4), t_end (1.0), alpha (5e-4: the schedule's step size; 0 = linear),
beta (0.99: its momentum) — the paper's defaults.
Metrics: taid_t (t used by the step).
"""
from __future__ import annotations

import jax.numpy as jnp

from distill import losses
from distill.algorithms import divergence


class TAID(divergence.Divergence):
  DEFAULTS = {'t_start': 0.4, 't_end': 1.0, 'alpha': 5e-4, 'beta': 0.99}
  accepts = ('forward_kl',)
  needs_teacher = True

  def check(self) -> None:
    loss = self.config.loss
    if loss.temperature != 1 or loss.temperature_squared_scale:
      raise ValueError('TAID interpolates logits at temperature 1: set config.loss.temperature=1 '
                       f'and temperature_squared_scale=False (got {loss.temperature}, '
                       f'{loss.temperature_squared_scale})')
    for name in self.DEFAULTS:
      self.real_in(name, 0.0, 1.0)
    try:
      losses.taid_init(**self.options)
    except ValueError as e:
      raise ValueError(f'config.algorithm.kwargs: {e} (algorithm '
                       f'{self.config.algorithm.name!r})') from None

  def init_state(self):
    return losses.taid_init(**self.options)

  def token_fn(self, ctx, state):
    del ctx
    loss = self.config.loss
    taid_fn = losses.taid_token_fn(state['t'])

    def token_fn(student_logits_NxV, teacher_logits_NxV, targets_N, mask_N=None):
      mask = jnp.ones(student_logits_NxV.shape[:-1]) if mask_N is None else mask_N
      per_token = loss.kd_weight * taid_fn(student_logits_NxV, teacher_logits_NxV, targets_N,
                                           mask)
      if loss.ce_weight:
        per_token += loss.ce_weight * losses.cross_entropy(student_logits_NxV, targets_N, mask)
      return per_token

    return token_fn

  def loss(self, ctx, params, trainable, prepared, drawn, state):
    value, metrics = super().loss(ctx, params, trainable, prepared, drawn, state)
    metrics['taid_t'] = (state['t'], jnp.float32(1.0))
    return value, metrics

  def update_state(self, state, metrics, step):
    loss_sum, normaliser = metrics['loss']
    return losses.taid_update(state, loss_sum / jnp.maximum(normaliser, 1e-9), step + 1,
                              self.config.total_steps)
