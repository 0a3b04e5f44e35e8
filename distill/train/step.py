"""The pure distillation step.

`train_step(ctx, state, teacher_params, batch) -> (state, metrics)` is jitted once by the
trainer with the state donated. The teacher runs inside the same compiled step under
stop_gradient, so no [B, T, V] teacher logits ever cross a jit boundary. Algorithms
(distill.algorithms) build their steps from `loss_and_grads` + `apply_gradients`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from distill import losses


@dataclasses.dataclass(frozen=True)
class StepContext:
  """Everything static the step closes over (graph definitions, optimiser, loss)."""
  student_graphdef: Any
  teacher_graphdef: Any | None
  optimizer: optax.GradientTransformation
  token_fn: Callable          # (student_logits_NxV, teacher_logits_NxV | None, targets_N) -> N
  chunk_size: int = 0         # 0: plain loss over full logits
  reduction: str = 'token_mean'


def model_outputs(graphdef, params, batch):
  """Final hidden states and the output projection (logits are formed by the loss)."""
  model = nnx.merge(graphdef, params)
  hidden_BxTxD = model.hidden_states(batch['tokens'], batch['input_mask'])
  return hidden_BxTxD, model.output_projection()


def distill_loss(ctx: StepContext, student_params, teacher_params, batch):
  """Weighted token loss of the student against the teacher and/or ground truth."""
  student_h, student_w = model_outputs(ctx.student_graphdef, student_params, batch)
  if ctx.teacher_graphdef is not None:
    teacher_h, teacher_w = jax.tree.map(
        jax.lax.stop_gradient, model_outputs(ctx.teacher_graphdef, teacher_params, batch))
  else:
    teacher_h = teacher_w = None
  weights_BxT, normaliser = losses.token_weights(batch['loss_mask'], ctx.reduction)
  if ctx.chunk_size:
    loss_sum, _ = losses.chunked_loss(student_h, student_w, teacher_h, teacher_w,
                                       batch['targets'], weights_BxT, ctx.token_fn,
                                       chunk_size=ctx.chunk_size)
  else:
    loss_sum, _ = losses.plain_loss(student_h, student_w, teacher_h, teacher_w,
                                     batch['targets'], weights_BxT, ctx.token_fn)
  loss = loss_sum / jnp.maximum(normaliser, 1e-9)
  metrics = {'loss': (loss_sum, normaliser),
             'tokens': (batch['loss_mask'].sum(), jnp.float32(1.0))}
  return loss, metrics


def apply_gradients(ctx: StepContext, state, grads, metrics):
  updates, opt_state = ctx.optimizer.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  metrics = dict(metrics, grad_norm=(optax.tree.norm(grads), jnp.float32(1.0)))
  new_state = dict(state, params=params, opt_state=opt_state, step=state['step'] + 1)
  return new_state, metrics


def train_step(ctx: StepContext, state, teacher_params, batch):
  """One supervised (off-policy) distillation or ground-truth step."""
  grad_fn = jax.grad(lambda p: distill_loss(ctx, p, teacher_params, batch), has_aux=True)
  grads, metrics = grad_fn(state['params'])
  return apply_gradients(ctx, state, grads, metrics)


def step_rng(state):
  """Per-step randomness: the run's key folded with the step (resumes identically)."""
  return jax.random.fold_in(state['rng'], state['step'])
