"""Gradient accumulation inside the jitted step (config.data.grad_accum_steps).

The rows a method draws for a step are cut into K micro-batches; each runs the objective's
`prepare` and `loss` and its gradient, one after another under `lax.scan`, so activations are
those of B/K rows. The sum of the micro-batches' gradients, each weighted by its share of the
whole batch's normaliser, is the gradient of the whole batch's loss: an objective reports its
loss as metrics['loss'] = (Σ w·ℓ, normaliser) with loss = sum / normaliser, and the whole
batch's loss is Σ_k sum_k / N with N the reduction's normaliser of all rows (tokens for
token_mean, rows for sequence_mean, 1 for sum). Sampling (the rows hook) still runs on the
whole batch.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from distill import losses
from distill.algorithms import hooks


def micro_batches(drawn: hooks.Drawn, steps: int) -> tuple[dict, dict | None]:
  """(rows, sample) as [K, B/K, ...]: micro-batch k holds rows k, k+K, k+2K, ..., so that
  each one is spread over the batch's devices as the whole batch is."""
  def split(x):
    return x.reshape(x.shape[0] // steps, steps, *x.shape[1:]).swapaxes(0, 1)

  sample = None if drawn.sample is None else jax.tree.map(split, drawn.sample)
  return jax.tree.map(split, drawn.rows), sample


def combine_metrics(stacked: dict, normaliser) -> dict:
  """(sum, count) pairs of K micro-batches [K] → the whole batch's pairs.

  Sums add. Counts add, except where every micro-batch counts 1: those are per-step figures
  (e.g. 'tokens', or the loss under the 'sum' reduction) and stay one per step.
  """
  def one(pair):
    value_sum, count_K = pair
    count = jnp.where(jnp.all(count_K == 1), 1.0, count_K.sum())
    return value_sum.sum(), count.astype(count_K.dtype)

  combined = {name: one(pair) for name, pair in stacked.items()}
  combined['loss'] = (stacked['loss'][0].sum(), normaliser)
  return combined


def over_micro_batches(grads_of: Callable, drawn: hooks.Drawn, steps: int, reduction: str):
  """(grads, metrics) of the whole of `drawn` from `grads_of(drawn_k) -> (grads, metrics)`
  on each of `steps` micro-batches; steps=1 is grads_of(drawn) itself."""
  if steps == 1:
    return grads_of(drawn)
  _, normaliser = losses.token_weights(drawn.rows['loss_mask'], reduction)
  rows_K, sample_K = micro_batches(drawn, steps)

  def body(grads_sum, micro):
    rows, sample = micro
    grads, metrics = grads_of(drawn._replace(rows=rows, sample=sample))
    # This micro-batch's loss is sum_k / count_k; the whole batch's is Σ sum_k / normaliser.
    share = metrics['loss'][1] / jnp.maximum(normaliser, 1e-9)
    grads_sum = jax.tree.map(lambda total, g: total + share * g, grads_sum, grads)
    return grads_sum, metrics

  first = jax.tree.map(lambda x: x[0], (rows_K, sample_K))
  grads_shape, _ = jax.eval_shape(lambda m: grads_of(drawn._replace(rows=m[0], sample=m[1])),
                                  first)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), grads_shape)
  grads, metrics_K = jax.lax.scan(body, zeros, (rows_K, sample_K))
  return grads, combine_metrics(metrics_K, normaliser)
