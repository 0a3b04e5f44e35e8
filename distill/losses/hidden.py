"""Hidden-state distillation (DistilBERT's cosine, TinyBERT's MSE) between chosen layers.

    layer_map = {student_layer: teacher_layer, ...}     e.g. {0: 1, 1: 3, 2: 5, 3: 7}
    projections = init_hidden_projections(key, layer_map, student_width, teacher_width)
    per_token_BxT = hidden_state_loss(student_hiddens, teacher_hiddens, mask_BxT, layer_map,
                                      projections, kind='cosine')

Hidden states are per-layer [B, T, D] arrays (a list, or one stacked [L, B, T, D] array).
When widths differ, each mapped student layer gets its own learned linear map
[D_student, D_teacher] (no bias), as TinyBERT's W_h; equal widths need none ({}).

Plugging in: the projections are trainable parameters of the *student side* that are not
part of the student model. Differentiate and optimise them together with the student, e.g.
    trainable = {'student': student_params, 'hidden_proj': projections}
    grads = jax.grad(loss_fn)(trainable); updates, opt = optimizer.update(grads, opt, trainable)
and checkpoint them with the optimiser state; drop them when exporting the student.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

KINDS = ('cosine', 'mse')


def _pairs(layer_map) -> list[tuple[int, int]]:
  pairs = list(layer_map.items()) if isinstance(layer_map, Mapping) else list(layer_map)
  if not pairs:
    raise ValueError('layer_map is empty: map at least one student layer to a teacher layer')
  return [(int(s), int(t)) for s, t in pairs]


def init_hidden_projections(key: jax.Array, layer_map, student_width: int, teacher_width: int,
                            dtype=jnp.float32) -> dict:
  """{str(student_layer): kernel [D_s, D_t]} (LeCun-normal), or {} when the widths match."""
  pairs = _pairs(layer_map)
  if student_width == teacher_width:
    return {}
  keys = jax.random.split(key, len(pairs))
  init = jax.nn.initializers.lecun_normal()
  return {str(s): init(k, (student_width, teacher_width), dtype)
          for k, (s, _) in zip(keys, pairs)}


def _per_token(student_BxTxD, teacher_BxTxD, kind):
  if kind == 'mse':
    return jnp.mean(jnp.square(student_BxTxD - teacher_BxTxD), axis=-1)
  # 1 − cosine; the small constant keeps the gradient finite at a zero vector.
  normalise = lambda x: x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)
  return 1.0 - jnp.sum(normalise(student_BxTxD) * normalise(teacher_BxTxD), axis=-1)


def hidden_state_loss(student_hiddens: Sequence[jax.Array] | jax.Array,
                      teacher_hiddens: Sequence[jax.Array] | jax.Array, mask_BxT: jax.Array,
                      layer_map, projections: dict | None = None, *, kind: str = 'cosine'):
  """Per-token loss [B, T] averaged over the mapped layers, fp32; 0 where mask is 0.

  cosine: 1 − cos(proj(h_s), h_t);  mse: mean over the hidden axis of (proj(h_s) − h_t)².
  Teacher states are constants (stop_gradient).
  """
  if kind not in KINDS:
    raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
  pairs = _pairs(layer_map)
  projections = projections or {}
  for s, t in pairs:
    if not 0 <= s < len(student_hiddens) or not 0 <= t < len(teacher_hiddens):
      raise ValueError(f'layer pair {s}->{t} out of range: the student has '
                       f'{len(student_hiddens)} layers, the teacher {len(teacher_hiddens)}')
  valid = mask_BxT != 0
  total = jnp.zeros(mask_BxT.shape, jnp.float32)
  for s, t in pairs:
    student = student_hiddens[s].astype(jnp.float32)
    teacher = jax.lax.stop_gradient(teacher_hiddens[t]).astype(jnp.float32)
    if str(s) in projections:
      student = student @ projections[str(s)].astype(jnp.float32)
    if student.shape != teacher.shape:
      raise ValueError(f'student layer {s} gives {student.shape} but teacher layer {t} is '
                       f'{teacher.shape}; widths differ, pass init_hidden_projections(...)')
    if student.shape[:-1] != mask_BxT.shape:
      raise ValueError(f'hidden states {student.shape} do not match mask {mask_BxT.shape}')
    student = jnp.where(valid[..., None], student, 0.0)
    teacher = jnp.where(valid[..., None], teacher, 0.0)
    total += _per_token(student, teacher, kind)
  return jnp.where(valid, total / len(pairs), 0.0)
