"""The token loss straight from final hidden states, in chunks: memory flat in B·T·V.

    chunked_loss(student_h_BxTxD, student_W_DxV, teacher_h_BxTxD, teacher_W_DxV,
                 targets_BxT, mask_BxT, token_fn, *, chunk_size=1024) -> (loss_sum, token_count)
    plain_loss(... same, no chunk_size ...)                           -> (loss_sum, token_count)

`plain_loss` is the readable reference (full [B·T, V] logits); `chunked_loss` computes the
same value and the same gradient without ever holding more than one chunk's logits. Tokens
are flattened, those carrying loss moved to the front, padded to a multiple of the chunk
size (padding has weight 0), and a `lax.scan` walks the chunks. Its `custom_vjp` forward
computes, per chunk, the loss *and* its gradient with respect to the chunk's student hidden
states and the student projection (accumulated), so the backward pass only scales those
stored [N, D] and [D, V] arrays by the incoming cotangent; no logits are kept for it.
Chunks whose weights are all zero (prompt, padding) are skipped with `lax.cond`, so
positions without loss cost no logits. That scan is `chunk_scan`, which takes any per-block
weighted sum; the top-k loss (`distill.losses.topk.topk_loss`) runs through it too.

Peak memory is about (chunk / (B·T)) of the plain form's working set plus [D, V]-sized
gradient buffers: at V=128256, B·T=4096, D=512, XLA's temp size is 25% of plain at chunk
1024 and 6.3% at chunk 256 (CPU and H200 alike; see distill.losses.bench).

mask_BxT holds 0/1 or non-negative weights (e.g. `reductions.token_weights`):
loss_sum = Σ w·ℓ and token_count = Σ w. Gradients flow to student_h and student_W only;
the teacher inputs are constants (stop_gradient). teacher_h/teacher_W may be None when the
token_fn needs no teacher (pure CE). `vocab_size` < V marks the projection's padding
columns: their logits become −inf in both models.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from distill.losses.objective import TokenFn


def logits_from_hidden(h_NxD, w_DxV, vocab_size: int | None = None):
  """fp32 logits [N, V]; columns from vocab_size on (the projection's padding) are −inf."""
  logits = jnp.einsum('nd,dv->nv', h_NxD, w_DxV, preferred_element_type=jnp.float32)
  if vocab_size is not None and vocab_size < logits.shape[-1]:
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
  return logits


def _weighted_sum(token_fn, vocab_size, student_h, student_w, teacher_h, teacher_w,
                  targets, weights):
  """Σ w·ℓ over a flat [N] block of tokens; the unit both forms evaluate."""
  student_logits = logits_from_hidden(student_h, student_w, vocab_size)
  teacher_logits = None if teacher_h is None else logits_from_hidden(teacher_h, teacher_w, vocab_size)
  per_token = token_fn(student_logits, teacher_logits, targets)
  return jnp.sum(jnp.where(weights != 0, weights * per_token, 0.0))


def _flatten(student_h, student_w, teacher_h, teacher_w, targets, mask, vocab_size):
  """Checks shapes; returns flat [N, ...] inputs with padded-position targets set to 0."""
  if student_h.ndim != 3 or student_w.ndim != 2 or student_h.shape[-1] != student_w.shape[0]:
    raise ValueError(f'student hidden {student_h.shape} and projection {student_w.shape} must '
                     f'be [B, T, D] and [D, V]')
  if targets.shape != student_h.shape[:2] or mask.shape != student_h.shape[:2]:
    raise ValueError(f'targets {targets.shape} and mask {mask.shape} must be '
                     f'{student_h.shape[:2]}')
  if (teacher_h is None) != (teacher_w is None):
    raise ValueError('teacher_h and teacher_W must both be given or both be None')
  if teacher_h is not None:
    if (teacher_h.shape[:2] != student_h.shape[:2] or teacher_w.shape[-1] != student_w.shape[-1]
        or teacher_h.shape[-1] != teacher_w.shape[0]):
      raise ValueError(f'teacher hidden {teacher_h.shape} / projection {teacher_w.shape} do not '
                       f'match the student ({student_h.shape}, {student_w.shape})')
    teacher_h, teacher_w = jax.lax.stop_gradient((teacher_h, teacher_w))
    teacher_h = teacher_h.reshape(-1, teacher_h.shape[-1])
  if vocab_size is not None and not 0 < vocab_size <= student_w.shape[-1]:
    raise ValueError(f'vocab_size must be in [1, {student_w.shape[-1]}], got {vocab_size}')
  weights = mask.reshape(-1).astype(jnp.float32)
  targets = jnp.where(weights != 0, targets.reshape(-1), 0)
  return (student_h.reshape(-1, student_h.shape[-1]), student_w, teacher_h, teacher_w,
          targets, weights)


def plain_loss(student_h_BxTxD, student_W_DxV, teacher_h_BxTxD, teacher_W_DxV, targets_BxT,
               mask_BxT, token_fn: TokenFn, *, vocab_size: int | None = None):
  """Reference form: full logits for every token. Returns (loss_sum, token_count)."""
  flat = _flatten(student_h_BxTxD, student_W_DxV, teacher_h_BxTxD, teacher_W_DxV,
                  targets_BxT, mask_BxT, vocab_size)
  return _weighted_sum(token_fn, vocab_size, *flat), flat[-1].sum()


def chunked_loss(student_h_BxTxD, student_W_DxV, teacher_h_BxTxD, teacher_W_DxV, targets_BxT,
                 mask_BxT, token_fn: TokenFn, *, chunk_size: int = 1024,
                 vocab_size: int | None = None):
  """Memory-flat form, equal to `plain_loss` in value and gradient. Returns (sum, count)."""
  student_h, student_w, teacher_h, teacher_w, targets, weights = _flatten(
      student_h_BxTxD, student_W_DxV, teacher_h_BxTxD, teacher_W_DxV, targets_BxT, mask_BxT,
      vocab_size)

  def weighted_sum(h, w, teacher_w, per_token, weights):
    teacher_h, targets = per_token
    return _weighted_sum(token_fn, vocab_size, h, w, teacher_h, teacher_w, targets, weights)

  loss_sum = chunk_scan(weighted_sum, student_h, student_w, teacher_w, (teacher_h, targets),
                        weights, chunk_size)
  return loss_sum, weights.sum()


def chunk_scan(weighted_sum, student_h_NxD, student_w_DxV, shared, per_token, weights_N,
               chunk_size: int):
  """Σ over chunks of weighted_sum(student_h_CxD, student_w_DxV, shared, per_token_C, weights_C).

  weighted_sum is a block's Σ w·ℓ (zero where w is 0), differentiable in its first two
  arguments; `shared` (any pytree, e.g. the teacher's projection) is passed whole to every
  chunk, `per_token` (a pytree of [N, ...] arrays) a chunk at a time. The result equals
  weighted_sum over all N tokens at once, in value and in its gradient with respect to
  student_h_NxD and student_w_DxV; `shared` and `per_token` are constants (no gradient).
  """
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f'chunk_size must be a positive int, got {chunk_size!r}')
  n_tokens = weights_N.shape[0]
  chunk = min(chunk_size, n_tokens)
  n_chunks = -(-n_tokens // chunk)
  # Tokens that carry loss go first (stable order), so prompt and padding positions fill
  # whole chunks at the end, which are skipped: compute follows the loss-bearing tokens.
  order = jnp.argsort(weights_N == 0, stable=True)

  def chunks(x):  # [N, ...] -> [n_chunks, chunk, ...], reordered, zero-padded (zero weight)
    x = jnp.pad(x[order], [(0, n_chunks * chunk - n_tokens)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(n_chunks, chunk, *x.shape[1:])

  shared, per_token = jax.lax.stop_gradient((shared, per_token))
  return _scan_loss(weighted_sum, chunks(student_h_NxD), student_w_DxV, shared,
                    jax.tree.map(chunks, per_token), chunks(weights_N))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan_loss(weighted_sum, student_h, student_w, shared, per_token, weights):
  """Σ over chunks (value only: what runs when no gradient is taken)."""
  def body(total, xs):
    h, chunk_inputs, w = xs
    value = jax.lax.cond(jnp.any(w != 0),
                         lambda: weighted_sum(h, student_w, shared, chunk_inputs, w),
                         lambda: jnp.float32(0.0))
    return total + value, None
  total, _ = jax.lax.scan(body, jnp.float32(0.0), (student_h, per_token, weights))
  return total


def _scan_loss_fwd(weighted_sum, student_h, student_w, shared, per_token, weights):
  value_and_grad = jax.value_and_grad(weighted_sum, argnums=(0, 1))

  def body(carry, xs):
    h, chunk_inputs, w = xs

    def compute(carry):
      total, dw = carry
      value, (dh_chunk, dw_chunk) = value_and_grad(h, student_w, shared, chunk_inputs, w)
      return (total + value, dw + dw_chunk.astype(jnp.float32)), dh_chunk

    def skip(carry):
      return carry, jnp.zeros_like(h)

    return jax.lax.cond(jnp.any(w != 0), compute, skip, carry)

  init = (jnp.float32(0.0), jnp.zeros(student_w.shape, jnp.float32))
  (total, dw), dh = jax.lax.scan(body, init, (student_h, per_token, weights))
  return total, (dh, dw.astype(student_w.dtype))


def _scan_loss_bwd(weighted_sum, residuals, cotangent):
  del weighted_sum
  dh, dw = residuals
  return ((cotangent * dh).astype(dh.dtype), (cotangent * dw).astype(dw.dtype), None, None, None)


_scan_loss.defvjp(_scan_loss_fwd, _scan_loss_bwd)
