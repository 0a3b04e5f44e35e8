"""Hidden-state KD (DistilBERT's cosine, TinyBERT's MSE) added to the divergence objective.

    loss = logit loss (config.loss, as in supervised KD) + weight · hidden loss

hidden loss = the token reduction (config.loss.reduction) of distill.losses.hidden_state_loss
between the outputs of chosen student layers and teacher layers, on completion tokens
(positions='completion') or on every real token (positions='all'). When the widths differ,
each mapped student layer has a learned projection [D_student, D_teacher] (TinyBERT's W_h).
The projections are trained with the student but are not part of it: the objective declares
them (`init_trainable`) and the step builder trains them with their own optimiser state (same
optimiser and schedule as the student, clipped on their own) in state['algo'], so
checkpoints carry them and the exported student does not. Any rows hook can feed it.

kwargs: layer_map — student layer → teacher layer, as 'S:T,S:T' (e.g. '0:1,1:3') or a
dict; '' (default) maps student layer i of L_s to teacher layer round((i+1)·L_t/L_s) − 1,
so the last layers meet. kind ('cosine' or 'mse'), weight (>= 0, default 1),
positions ('completion' or 'all').
Metrics: logit_loss, hidden_loss (token reductions), loss = logit_loss + weight·hidden_loss.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from distill import losses
from distill.algorithms import divergence, hooks
from distill.losses.hidden import KINDS

POSITIONS = ('completion', 'all')


def default_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
  return {i: round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)}


def parse_layer_map(value) -> dict[int, int]:
  """'0:1,1:3' or {0: 1, '1': 3} -> {0: 1, 1: 3}; ValueError on anything else."""
  if isinstance(value, str):
    pairs = [item.split(':') for item in value.split(',') if item.strip()]
    if any(len(p) != 2 for p in pairs):
      raise ValueError(f"expected 'S:T,S:T', got {value!r}")
  elif isinstance(value, Mapping):
    pairs = list(value.items())
  else:
    raise ValueError(f"expected 'S:T,S:T' or a dict, got {value!r}")
  try:
    return {int(s): int(t) for s, t in pairs}
  except (TypeError, ValueError):
    raise ValueError(f'layers must be integers, got {value!r}') from None


class HiddenStates(divergence.Divergence):
  DEFAULTS = {'layer_map': '', 'kind': 'cosine', 'weight': 1.0, 'positions': 'completion'}
  needs_teacher = True

  def check(self) -> None:
    o = self.options
    n_student, n_teacher = self.run.model_config.n_layers, self.run.teacher_config.n_layers
    if o['layer_map'] in ('', None):
      self.layer_map = default_layer_map(n_student, n_teacher)
    else:
      try:
        self.layer_map = parse_layer_map(o['layer_map'])
      except ValueError as e:
        raise self.kwarg_error('layer_map', str(e)) from None
    if not self.layer_map:
      raise self.kwarg_error('layer_map', 'maps no layer')
    for s, t in self.layer_map.items():
      if not (0 <= s < n_student and 0 <= t < n_teacher):
        raise self.kwarg_error('layer_map', f'pair {s}:{t} is out of range: the student has '
                               f'{n_student} layers, the teacher {n_teacher}')
    if o['kind'] not in KINDS:
      raise self.kwarg_error('kind', f'must be one of {KINDS}, got {o["kind"]!r}')
    if not hooks.is_real(o['weight']) or not o['weight'] >= 0:
      raise self.kwarg_error('weight', f'must be a number >= 0, got {o["weight"]!r}')
    if o['positions'] not in POSITIONS:
      raise self.kwarg_error('positions', f'must be one of {POSITIONS}, got '
                             f'{o["positions"]!r}')

  def init_trainable(self):
    key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 1)
    return losses.init_hidden_projections(
        key, self.layer_map, self.run.model_config.d_model, self.run.teacher_config.d_model)

  def prepare(self, ctx, teacher_params, drawn, state):
    """The teacher's final hidden states, mapped layers' outputs and output projection."""
    del state
    teacher = nnx.merge(ctx.teacher_graphdef, jax.lax.stop_gradient(teacher_params))
    teacher_h, teacher_layers = teacher.hidden_states(
        drawn.rows['tokens'], drawn.rows['input_mask'], return_layers=True)
    return teacher_h, teacher_layers, teacher.output_projection()

  def loss(self, ctx, params, projections, teacher_outputs, drawn, state):
    del state
    batch = drawn.rows
    tokens, input_mask = batch['tokens'], batch['input_mask']
    teacher_h, teacher_layers, teacher_w = teacher_outputs
    weights_BxT, normaliser = losses.token_weights(batch['loss_mask'], ctx.reduction)
    hidden_mask = batch['loss_mask'] if self.options['positions'] == 'completion' else input_mask
    hidden_weights_BxT, hidden_normaliser = losses.token_weights(hidden_mask, ctx.reduction)

    student = nnx.merge(ctx.student_graphdef, params)
    h, layers = student.hidden_states(tokens, input_mask, return_layers=True)
    logit_sum = divergence.weighted_loss(ctx, h, student.output_projection(), teacher_h,
                                         teacher_w, batch['targets'], weights_BxT, ctx.token_fn)
    per_token = losses.hidden_state_loss(layers, teacher_layers, hidden_mask, self.layer_map,
                                         projections, kind=self.options['kind'])
    hidden_sum = jnp.sum(hidden_weights_BxT * per_token)
    logit_loss = logit_sum / jnp.maximum(normaliser, 1e-9)
    hidden_loss = hidden_sum / jnp.maximum(hidden_normaliser, 1e-9)
    loss = logit_loss + self.options['weight'] * hidden_loss
    one = jnp.float32(1.0)
    # The loss as (sum, normaliser) over the logit term's tokens, the pair gradient
    # accumulation weights micro-batches by (exact when the hidden term counts the same
    # positions, positions='completion').
    return loss, {'loss': (loss * normaliser, normaliser), 'logit_loss': (logit_sum, normaliser),
                  'hidden_loss': (hidden_sum, hidden_normaliser),
                  'tokens': (batch['loss_mask'].sum(), one)}
