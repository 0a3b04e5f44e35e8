"""The per-token training objective: a divergence to the teacher mixed with ground-truth CE.

`token_objective(...)` returns the unit that both the plain and the chunked loss evaluate,
    token_fn(student_logits_NxV, teacher_logits_NxV | None, targets_N) -> per_token_N
so the same objective is exact in either form.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from distill.losses import divergences

TokenFn = Callable[..., jax.Array]


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None):
  """−log q(target) per token in fp32, never softened by a temperature; 0 where mask is 0.

  Targets must lie in [0, V) where the mask is set; elsewhere any value is harmless.
  """
  if targets.shape != logits.shape[:-1]:
    raise ValueError(f'targets shape {targets.shape} does not match logits {logits.shape}')
  valid = jnp.ones(targets.shape, bool) if mask is None else mask != 0
  safe_logits = jnp.where(valid[..., None], logits.astype(jnp.float32), 0.0)
  safe_targets = jnp.where(valid, targets, 0).astype(jnp.int32)
  log_q = jax.nn.log_softmax(safe_logits, axis=-1)
  nll = -jnp.take_along_axis(log_q, safe_targets[..., None], axis=-1)[..., 0]
  return jnp.where(valid, nll, 0.0)


def token_objective(divergence: str = 'forward_kl', *, kd_weight: float = 1.0,
                    ce_weight: float = 0.0, temperature: float = 1.0,
                    temperature_squared_scale: bool = False, **hparams) -> TokenFn:
  """kd_weight·[τ²]·D_τ(teacher, student) + ce_weight·CE(student, targets), per token.

  The temperature softens only the divergence term; `temperature_squared_scale` multiplies
  it by τ² (Hinton's correction keeping gradient magnitudes comparable across τ).
  Everything is validated here, before any tracing. The returned function also takes an
  optional `mask_N` (nonzero = counts; values elsewhere are 0 and carry no gradient).
  """
  for name, value in (('kd_weight', kd_weight), ('ce_weight', ce_weight)):
    if not isinstance(value, (int, float)) or value < 0:
      raise ValueError(f'{name} must be a number >= 0, got {value!r}')
  if kd_weight == 0 and ce_weight == 0:
    raise ValueError('kd_weight and ce_weight are both 0: the objective would be identically 0')
  # Validates the name and hyper-parameters even when the KD term is off.
  divergence_fn = divergences.get(divergence, temperature=temperature, **hparams)
  kd_scale = kd_weight * (temperature**2 if temperature_squared_scale else 1.0)

  def token_fn(student_logits_NxV, teacher_logits_NxV, targets_N, mask_N=None):
    mask = jnp.ones(student_logits_NxV.shape[:-1], bool) if mask_N is None else mask_N
    per_token = jnp.zeros(mask.shape, jnp.float32)
    if kd_weight:
      if teacher_logits_NxV is None:
        raise ValueError(f'kd_weight={kd_weight} needs teacher logits, got None')
      per_token += kd_scale * divergence_fn(student_logits_NxV, teacher_logits_NxV, mask)
    if ce_weight:
      per_token += ce_weight * cross_entropy(student_logits_NxV, targets_N, mask)
    return per_token

  return token_fn


def hinton(alpha: float = 0.5, temperature: float = 2.0) -> TokenFn:
  """Hinton et al. (2015): α·τ²·KL(p_τ‖q_τ) + (1−α)·CE(q, targets)."""
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'alpha must be in [0, 1], got {alpha}')
  return token_objective('forward_kl', kd_weight=alpha, ce_weight=1.0 - alpha,
                         temperature=temperature, temperature_squared_scale=True)
