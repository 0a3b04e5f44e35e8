"""Reducing per-token losses to a scalar, exactly, also across hosts.

Every mode is a weighted token sum divided by a normaliser: `token_weights` gives both, so a
loss that can only sum (the chunked form) serves every mode, and `sum_and_count` gives the
(sum, count) pair whose sums over hosts divide to the exact global value.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

MODES = ('token_mean', 'sequence_mean', 'sum')


def token_weights(mask_BxT: jax.Array, mode: str = 'token_mean'):
  """(weights_BxT, normaliser) such that the reduction is Σ weights·loss / normaliser.

    token_mean:    weights = mask,                        normaliser = number of tokens
    sequence_mean: weights = mask / tokens in its row,    normaliser = rows with a token
    sum:           weights = mask,                        normaliser = 1
  """
  if mode not in MODES:
    raise ValueError(f'unknown reduction mode {mode!r}; valid modes: {", ".join(MODES)}')
  if mask_BxT.ndim != 2:
    raise ValueError(f'mask must be [B, T], got shape {mask_BxT.shape}')
  mask = (mask_BxT != 0).astype(jnp.float32)
  if mode == 'token_mean':
    return mask, mask.sum()
  if mode == 'sequence_mean':
    per_row = mask.sum(axis=1, keepdims=True)
    return mask / jnp.maximum(per_row, 1.0), (per_row > 0).sum().astype(jnp.float32)
  return mask, jnp.float32(1.0)


def sum_and_count(per_token_BxT: jax.Array, mask_BxT: jax.Array, mode: str = 'token_mean'):
  """(sum, count) with reduce = sum / count; add both over hosts for the global value.

  For mode='sum' the count is 1 on every host: combine hosts by adding the sums only.
  """
  weights, normaliser = token_weights(mask_BxT, mode)
  if per_token_BxT.shape != weights.shape:
    raise ValueError(f'per-token values {per_token_BxT.shape} and mask {weights.shape} differ')
  # `where`, not a product: a NaN at a masked position must not leak into the sum.
  total = jnp.sum(jnp.where(weights != 0, weights * per_token_BxT.astype(jnp.float32), 0.0))
  return total, normaliser


def reduce(per_token_BxT: jax.Array, mask_BxT: jax.Array, mode: str = 'token_mean'):
  """Scalar loss; 0 when no token counts."""
  total, count = sum_and_count(per_token_BxT, mask_BxT, mode)
  return jnp.where(count > 0, total / jnp.maximum(count, 1e-30), 0.0)
