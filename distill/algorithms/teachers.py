"""Several teachers (config.teachers): mixed per token by weights, or routed per row.

With `config.teachers.more` set, the step's teacher is an `Ensemble`: the teachers'
graphdefs (a static, hashable value in place of one graphdef) and a tuple of their params
(the step's teacher argument, in the same order: config.teacher first).

  mixed   p_t = Σ_i w_i · p_i,t, the mixture of the teachers' distributions at the loss's
          temperature τ (config.teachers.weights, constant over tokens). The divergence
          is taken to that mixture: D(p, q_t), not Σ_i w_i · D(p_i, q_t). The mixture is
          what ensemble distillation means in most papers (Hinton et al. 2015 average the
          teachers' probabilities; so do multi-teacher KD works since), and it is the one
          form that keeps any registered divergence's own meaning (JSD, skew KL, TVD);
          with forward KL the two differ only by a term the student does not move
          (Σ_i w_i KL(p_i‖q) = KL(p‖q) + Σ_i w_i KL(p_i‖p)).
  routed  each row is distilled from one teacher, the one whose route value
          (config.teachers.routes) its data names (the task's `route(split, index)`, e.g.
          a JSONL field): the mixture with the one-hot weights of the row's route, so the
          same code computes both.

The mixture enters the divergence as logits m = τ·log Σ_i w_i softmax(z_i / τ), whose
softmax at temperature τ is exactly the mixture; a zero weight contributes exp(−inf) = 0,
so weights (1, 0) give the first teacher's log-probabilities (to the last bit of a second
log_softmax). The loss runs through the chunked scan (distill.losses.chunk_scan) with every
teacher's hidden states and projection, so no teacher's [B, T, V] logits exist at once.

Metrics: `teacher_kl/NAME`, each teacher's forward KL(p_i‖q) at temperature 1 over the
tokens it teaches (all of them when mixed, its rows when routed) — one more value-only
pass over the tokens per teacher.

Only the default objective (config.loss) takes several teachers, with rows that do not run
the teacher themselves (dataset rows, or the student's samples); the others are refused by
name before compiling.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from distill import losses
from distill.algorithms import divergence, hooks, rollout
from distill.models.layers import softcap

ROUTE_FIELD = 'teacher_route'   # [B, T] int32: the index of each row's teacher (constant in T)


@dataclasses.dataclass(frozen=True)
class Ensemble:
  """The teachers of a run, static in the step (hashable: it is part of the compiled step)."""
  graphdefs: tuple
  names: tuple[str, ...]        # for metrics: teacher_kl/NAME
  softcaps: tuple[float, ...]   # each teacher's final-logit soft-capping (0: none)
  weights: tuple[float, ...]    # mixed: one per teacher, summing to 1; () when routed

  @property
  def routed(self) -> bool:
    return not self.weights

  def token_weights(self, rows) -> jax.Array:
    """[B, T, K]: each teacher's weight at each position."""
    if self.routed:
      return jax.nn.one_hot(rows[ROUTE_FIELD], len(self.graphdefs), dtype=jnp.float32)
    return jnp.broadcast_to(jnp.asarray(self.weights, jnp.float32),
                            rows['tokens'].shape + (len(self.weights),))


def is_ensemble(graphdef) -> bool:
  return isinstance(graphdef, Ensemble)


def mixture_logits(teacher_logits: list, weights_NxK, temperature: float = 1.0):
  """τ·log Σ_i w_i softmax(z_i / τ) [N, V]: logits whose softmax at τ is the mixture."""
  logprobs_KxNxV = jnp.stack([jax.nn.log_softmax(z / temperature, axis=-1)
                              for z in teacher_logits])
  log_weights_KxNx1 = jnp.log(weights_NxK.T)[..., None]   # log 0 = -inf: no contribution
  return temperature * jax.nn.logsumexp(log_weights_KxNx1 + logprobs_KxNxV, axis=0)


def _capped(logits, limit: float):
  return softcap(logits, limit) if limit else logits


def ensemble_logits(ensemble: Ensemble, params: tuple, batch) -> jax.Array:
  """[B, T, V] logits of the teachers' mixture at temperature 1 (held-out evaluation)."""
  logits = [_capped(nnx.merge(g, p)(batch['tokens'], batch['input_mask']), cap)
            for g, p, cap in zip(ensemble.graphdefs, params, ensemble.softcaps)]
  weights_BxTxK = ensemble.token_weights(batch)
  B, T, K = weights_BxTxK.shape
  mixed = mixture_logits([z.reshape(B * T, -1) for z in logits], weights_BxTxK.reshape(-1, K))
  return mixed.reshape(B, T, -1)


def _token_sum(ctx, student_h_BxTxD, student_w, teacher_hs, teacher_ws, caps, targets_BxT,
               weights_BxT, per_token_BxTxK, fn):
  """Σ_t weight_t · fn(student logits, [teacher logits], targets, per-token [K]), chunked
  when ctx.chunk_size > 0; differentiable in the student's hidden states and projection."""
  def weighted_sum(h_NxD, w_DxV, teacher_ws, per_token, weights_N):
    teacher_hs, targets_N, extra_NxK = per_token
    student_logits = _capped(losses.chunked.logits_from_hidden(h_NxD, w_DxV),
                             ctx.student_softcap)
    teacher_logits = [_capped(losses.chunked.logits_from_hidden(th, tw), cap)
                      for th, tw, cap in zip(teacher_hs, teacher_ws, caps)]
    per_token_N = fn(student_logits, teacher_logits, targets_N, extra_NxK)
    return jnp.sum(jnp.where(weights_N != 0, weights_N * per_token_N, 0.0))

  flat = lambda x: x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])   # [B, T, ...] -> [N, ...]
  weights_N = jax.lax.stop_gradient(weights_BxT).reshape(-1)
  per_token = jax.lax.stop_gradient(
      (tuple(flat(h) for h in teacher_hs), flat(jnp.where(weights_BxT != 0, targets_BxT, 0)),
       flat(per_token_BxTxK)))
  teacher_ws = jax.lax.stop_gradient(tuple(teacher_ws))
  if ctx.chunk_size:
    return losses.chunk_scan(weighted_sum, flat(student_h_BxTxD), student_w, teacher_ws,
                             per_token, weights_N, ctx.chunk_size)
  return weighted_sum(flat(student_h_BxTxD), student_w, teacher_ws, per_token, weights_N)


class MixedTeachers(divergence.Divergence):
  """config.loss to the teachers' mixture (or routed teacher), each teacher's KL reported."""
  needs_teacher = True

  def check_rows(self, rows: hooks.Rows) -> None:
    rows_cls = getattr(rows, 'routed_from', type(rows))   # the method's own rows hook
    if not (rows_cls is hooks.Rows or   # the dataset's rows as they come
            (isinstance(rows, rollout.Sampled) and not rows.teacher_generates)):
      raise ValueError(f'algorithm {self.config.algorithm.name!r}: its rows '
                       f'({rows_cls.__name__}) run the teacher themselves, which several '
                       'teachers (config.teachers.more) do not support; use rows from the data '
                       'or the student\'s samples (supervised, gkd without seq_kd, distillm)')

  @property
  def needs_fields(self):
    routed = self.run.teacher_graphdef.routed
    return hooks.ROW_KEYS + ((ROUTE_FIELD,) if routed else ())

  def loss(self, ctx, params, trainable, prepared, drawn, state):
    del trainable, state
    ensemble, rows = ctx.teacher_graphdef, drawn.rows
    student_h, student_w = hooks.model_outputs(ctx.student_graphdef, params, rows)
    outputs = [jax.lax.stop_gradient(hooks.model_outputs(g, p, rows))
               for g, p in zip(ensemble.graphdefs, prepared)]
    teacher_hs, teacher_ws = [h for h, _ in outputs], [w for _, w in outputs]
    mix_BxTxK = ensemble.token_weights(rows)
    weights_BxT, normaliser = losses.token_weights(rows['loss_mask'], ctx.reduction)
    temperature, token_fn = self.config.loss.temperature, ctx.token_fn

    def mixed_fn(student_logits, teacher_logits, targets_N, mix_NxK):
      return token_fn(student_logits, mixture_logits(teacher_logits, mix_NxK, temperature),
                      targets_N)

    total = _token_sum(ctx, student_h, student_w, teacher_hs, teacher_ws, ensemble.softcaps,
                       rows['targets'], weights_BxT, mix_BxTxK, mixed_fn)
    mask_BxT = (rows['loss_mask'] != 0).astype(jnp.float32)
    metrics = {'loss': (total, normaliser), 'tokens': (mask_BxT.sum(), jnp.float32(1.0))}
    metrics.update(self._teacher_kls(ctx, student_h, student_w, outputs, rows, mask_BxT,
                                     mix_BxTxK))
    return total / jnp.maximum(normaliser, 1e-9), metrics

  def _teacher_kls(self, ctx, student_h, student_w, outputs, rows, mask_BxT, mix_BxTxK):
    """teacher_kl/NAME: (Σ KL(p_i‖q), tokens) over the tokens teacher i has weight on."""
    ensemble, forward_kl = ctx.teacher_graphdef, losses.get('forward_kl')
    student_h, student_w = jax.lax.stop_gradient((student_h, student_w))
    metrics = {}
    for i, ((h, w), name, cap) in enumerate(zip(outputs, ensemble.names, ensemble.softcaps)):
      taught_BxT = mask_BxT * (mix_BxTxK[..., i] > 0)
      kl_sum = _token_sum(ctx, student_h, student_w, [h], [w], (cap,), rows['targets'],
                          taught_BxT, mix_BxTxK[..., :0],
                          lambda s, t, targets, extra: forward_kl(s, t[0], targets >= 0))
      metrics[f'teacher_kl/{name}'] = (kl_sum, taught_BxT.sum())
    return metrics


def routed_rows(rows_cls: type[hooks.Rows]) -> type[hooks.Rows]:
  """rows_cls whose rows also carry the batch's ROUTE_FIELD (each row keeps its prompt's
  teacher, sampled completions included)."""

  class Routed(rows_cls):
    fields = tuple(rows_cls.fields) + (ROUTE_FIELD,)
    routed_from = rows_cls

    def draw(self, ctx, inputs, batch):
      drawn = super().draw(ctx, inputs, batch)
      return drawn._replace(rows={**drawn.rows, ROUTE_FIELD: batch[ROUTE_FIELD]})

  Routed.__name__ = Routed.__qualname__ = f'Routed{rows_cls.__name__}'
  return Routed


def hooks_for(spec, ensemble: Ensemble):
  """(rows class, objective class) of a method trained against several teachers."""
  if spec.objective is not divergence.Divergence:
    raise ValueError(f'algorithm {spec.name!r} minimises {spec.objective.__name__}, which does '
                     'not take several teachers (config.teachers.more); methods whose objective '
                     'is config.loss do (supervised, gkd, distillm)')
  rows = routed_rows(spec.rows) if ensemble.routed else spec.rows
  return rows, MixedTeachers
