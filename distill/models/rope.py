"""Rotary position embedding: the (cos, sin) tables of plain RoPE and of Hugging Face's
rope_scaling types, their per-position lookup, and the rotation itself.

The formulas follow the published methods as Hugging Face configures them (Position
Interpolation = 'linear'; Llama 3.1's frequency-dependent 'llama3'; YaRN's ramp between
interpolated and extrapolated frequencies with its attention factor folded into cos and sin;
dynamic NTK, which is plain RoPE within the original context, the only range allowed).
"""
import math

import jax.numpy as jnp

from distill.models.config import ModelConfig


def _plain_inv_freq(dim, theta):
  return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def _llama3(inv_freq, s):
  old_len = s['original_max_position_embeddings']
  low, high = s['low_freq_factor'], s['high_freq_factor']
  wavelen = 2 * math.pi / inv_freq
  # Long wavelengths (low frequencies) are interpolated by `factor`, short ones kept, and the
  # band between blends the two linearly in old_len / wavelen.
  scaled = jnp.where(wavelen > old_len / low, inv_freq / s['factor'], inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  blended = (1 - smooth) * scaled / s['factor'] + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return jnp.where(medium, blended, scaled)


def _yarn_mscale(factor, mscale=1.0):
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(dim, theta, s):
  """(inv_freq, attention factor) of YaRN."""
  factor, old_len = s['factor'], s['original_max_position_embeddings']
  attention = s.get('attention_factor')
  if attention is None:
    if s.get('mscale') and s.get('mscale_all_dim'):
      attention = _yarn_mscale(factor, s['mscale']) / _yarn_mscale(factor, s['mscale_all_dim'])
    else:
      attention = _yarn_mscale(factor)
  # Dimension index whose wavelength makes `rotations` turns over the original context.
  def dim_of(rotations):
    return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))
  low, high = dim_of(s.get('beta_fast') or 32), dim_of(s.get('beta_slow') or 1)
  if s.get('truncate', True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  high = high + 0.001 if low == high else high
  ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
  extrapolated = _plain_inv_freq(dim, theta)
  interpolated = extrapolated / factor
  return interpolated * ramp + extrapolated * (1 - ramp), attention


def inv_freq(cfg: ModelConfig, local: bool = False):
  """(inverse frequencies [rotary_dim / 2] fp32, attention factor) of global or sliding layers."""
  dim = cfg.rotary_dim
  if local and cfg.rope_local_theta:
    return _plain_inv_freq(dim, cfg.rope_local_theta), 1.0
  s = cfg.rope_scaling_dict
  rope_type = s.get('rope_type', 'default')
  if rope_type == 'yarn':
    return _yarn(dim, cfg.rope_theta, s)
  freq = _plain_inv_freq(dim, cfg.rope_theta)
  if rope_type == 'linear':
    return freq / s['factor'], 1.0
  if rope_type == 'llama3':
    return _llama3(freq, s), 1.0
  return freq, 1.0   # default, and dynamic within the original context


def table(cfg: ModelConfig, n_positions: int, local: bool = False):
  """cos, sin [n_positions, rotary_dim/2] of the rotary angles of positions 0..n_positions-1,
  in fp32 (times YaRN's attention factor, which thereby scales q and k)."""
  freq, attention = inv_freq(cfg, local)
  angle_NxK = jnp.arange(n_positions, dtype=jnp.float32)[:, None] * freq
  if attention == 1.0:
    return jnp.cos(angle_NxK), jnp.sin(angle_NxK)
  return jnp.cos(angle_NxK) * attention, jnp.sin(angle_NxK) * attention


def has_local_table(cfg: ModelConfig) -> bool:
  """Whether sliding layers rotate with a table of their own (Gemma 3's local base)."""
  return bool(cfg.rope_local_theta) and cfg.any_sliding


def at(tables, pos_BxT):
  """The rows of `table` at positions pos: cos, sin [B, T, 1, rotary_dim/2].

  A lookup rather than cos/sin of the angles: XLA fuses the tables into each layer's q and k
  fusions, and a decode step then evaluated the trigonometry in all of them.
  """
  return tuple(jnp.take(t, pos_BxT, axis=0)[:, :, None, :] for t in tables)


def rotate(x_BxTxHxDh, rope):
  """Rotary embedding, HF 'rotate_half' convention (pairs i and i + R/2 of the first R =
  rotary_dim dims; the rest pass through), computed in fp32."""
  cos, sin = rope
  rot = 2 * cos.shape[-1]
  x = x_BxTxHxDh.astype(jnp.float32)
  x1, x2 = x[..., :rot // 2], x[..., rot // 2:rot]
  parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
  if rot < x.shape[-1]:
    parts.append(x[..., rot:])
  return jnp.concatenate(parts, axis=-1).astype(x_BxTxHxDh.dtype)
