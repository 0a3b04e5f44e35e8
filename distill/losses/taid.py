"""TAID: Temporally Adaptive Interpolated Distillation (Shing et al., ICLR 2025).

The student is trained toward an intermediate target that moves from (mostly) itself to
the teacher:  p_t = softmax((1−t)·stopgrad(z_student) + t·z_teacher),  loss = KL(p_t ‖ q).

t starts at t_start and follows the paper's adaptive schedule (Algorithm 1; the official
code's `update_t`): with J the loss value of each step,
    δ_n  = (J_{n−1} − J_n) / J_{n−1}                  relative improvement
    m_n  = β·m_{n−1} + (1−β)·δ_n                       momentum
    t_n  = min(t_end, max(t_linear(n), t_{n−1} + α·sigmoid(m_n)·(1 − t_{n−1})))
where t_linear(n) = t_start + (t_end − t_start)·n/N is a floor guaranteeing that t reaches
t_end by the last step. The first call only records J. α = 0 gives the linear schedule.
Note: the official code feeds the cross-entropy −Σ p_t log q (the KL plus the entropy of
p_t) to the update; pass whichever `loss_value` you want to track, e.g. `taid_loss`'s mean.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from distill.losses import divergences

_FORWARD_KL = divergences.get('forward_kl')


def taid_teacher_logits(student_logits, teacher_logits, t):
  """(1−t)·stopgrad(student) + t·teacher, fp32; a zero weight drops its term (so −inf·0 never
  occurs), and the whole target is a constant for the gradient."""
  t = jnp.asarray(t, jnp.float32)
  student = jnp.where(t < 1.0, (1.0 - t) * student_logits.astype(jnp.float32), 0.0)
  teacher = jnp.where(t > 0.0, t * teacher_logits.astype(jnp.float32), 0.0)
  return jax.lax.stop_gradient(student + teacher)


def taid_loss(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT, t):
  """Per-token KL(p_t ‖ q_student), [B, T]; t may be a traced scalar (it lives in the state)."""
  target = taid_teacher_logits(student_logits_BxTxV, teacher_logits_BxTxV, t)
  return _FORWARD_KL(student_logits_BxTxV, target, mask_BxT)


def taid_token_fn(t):
  """TAID as a token_fn(student_logits_NxV, teacher_logits_NxV, targets_N) for the plain and
  chunked losses; t is usually the traced state['t'] of the current step."""
  def token_fn(student_logits_NxV, teacher_logits_NxV, targets_N, mask_N=None):
    del targets_N
    mask = jnp.ones(student_logits_NxV.shape[:-1]) if mask_N is None else mask_N
    return taid_loss(student_logits_NxV, teacher_logits_NxV, mask, t)
  return token_fn


def taid_init(t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4,
              beta: float = 0.99) -> dict:
  """Schedule state: a dict of fp32 scalars (the hyper-parameters travel with it, so
  `taid_update` needs nothing else and a checkpoint resumes the schedule exactly).
  Defaults are the paper's (t_start=0.4, t_end=1, α=5e-4, β=0.99)."""
  if not 0.0 <= t_start < 1.0:
    raise ValueError(f't_start must be in [0, 1), got {t_start}')
  if not t_start < t_end <= 1.0:
    raise ValueError(f't_end must be in (t_start, 1], got {t_end}')
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'alpha (step size) must be in [0, 1], got {alpha}')
  if not 0.0 <= beta < 1.0:
    raise ValueError(f'beta (momentum) must be in [0, 1), got {beta}')
  scalar = lambda v: jnp.asarray(v, jnp.float32)
  return {'t': scalar(t_start), 'prev_loss': scalar(jnp.inf), 'momentum': scalar(0.0),
          't_start': scalar(t_start), 't_end': scalar(t_end), 'alpha': scalar(alpha),
          'beta': scalar(beta)}


def taid_update(state: dict, loss_value, step, total_steps) -> dict:
  """One schedule step after a training step with loss `loss_value` (jit-friendly)."""
  loss = jnp.asarray(loss_value, jnp.float32)
  first = jnp.isinf(state['prev_loss'])
  prev = jnp.where(first, 1.0, state['prev_loss'])
  relative_change = (prev - loss) / (prev + 1e-15)
  momentum = state['beta'] * state['momentum'] + (1.0 - state['beta']) * relative_change
  t = state['t']
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / jnp.asarray(total_steps, jnp.float32),
                      0.0, 1.0)
  t_linear = state['t_start'] + (state['t_end'] - state['t_start']) * progress
  t_adaptive = t + state['alpha'] * jax.nn.sigmoid(momentum) * (1.0 - t)
  new_t = jnp.minimum(state['t_end'], jnp.maximum(t_linear, t_adaptive))
  return dict(state, t=jnp.where(first, t, new_t), prev_loss=loss,
              momentum=jnp.where(first, state['momentum'], momentum))
