"""GGUF block formats as JAX fake quantization: float32 rows -> the values llama.cpp will run.

`fake_quantize(x_Nxblock, qtype)` returns what `gguf.quants.dequantize` gives for the bytes
`distill.models.gguf_quants.quantize` (llama.cpp's reference quantizer) writes for the same rows,
bit for bit, so a student trained through these values is exported holding exactly them. The
search rules are the ones gguf_quants describes, written again over jax.numpy because they must
run inside the jitted train step. Exactness constrains the arithmetic as it does there (float32,
each expression in the same order, sums over a block in index order: `_seq_sum`, whose unrolled
adds XLA does not reassociate), and XLA's rewrites must be kept out:

* it contracts `a*b + c` into a fused multiply-add (one rounding instead of two) on CPU, and
  GPU compilers do the same;
* it turns a division by a constant or by a broadcast value into a multiplication by the
  rounded reciprocal, and rewrites chains of divisions (1 / (a / b) -> b / a);
either changes last bits, enough for a search to pick another candidate grid. So every product
that is then added, and every operand and result of a division, passes through `_opaque`: a
select that returns its input but that no rewrite sees through (`_div`, `_seq_sum` apply it).

The dequantisation is gguf's: (d * scale) * q - (dmin * min) with fp16 d and dmin.
Blocks are rows of `x`: [N, 32] for Q8_0/Q4_0/Q5_0/Q5_1, [N, 256] for the K-quants; F16 takes any.
"""
from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np

Q = gguf.GGMLQuantizationType
F32 = np.float32
_EPS = F32(1e-15)   # llama.cpp's GROUP_MAX_EPS: a group below it is all zeros


def _opaque(v):
  """v, as a value XLA can neither fuse into the add that uses it nor fold into an algebraic
  rewrite. A NaN stays NaN (the searches rely on NaN comparing false)."""
  return jnp.where(jnp.isnan(v), F32(np.nan), v)


def _div(n, d):
  """n / d rounded as one IEEE division (see the module docstring). The divisor is made full
  size and data-dependent: XLA rewrites a division by a constant, or by a broadcast, into a
  multiplication by a reciprocal."""
  n, d = jnp.broadcast_arrays(jnp.asarray(n, jnp.float32), jnp.asarray(d, jnp.float32))
  return _opaque(_opaque(n) / jnp.where(jnp.isnan(n), F32(1), d))


def _safe_div(n, d):
  """n/d, 0 where d is 0 (C's `d ? n/d : 0`)."""
  return jnp.where(d != 0, _div(n, jnp.where(d != 0, d, F32(1))), F32(0))


def _seq_sum(a_KxM):
  """Sum over axis 0 in index order, as C's `s += a[i]` loop."""
  a_KxM = _opaque(a_KxM)
  total_M = a_KxM[0]
  for k in range(1, a_KxM.shape[0]):
    total_M = total_M + a_KxM[k]
  return total_M


def _nearest_int(v):
  """C's nearest_int (round half to even), clipped to its valid range, as int32."""
  return jnp.rint(jnp.clip(jnp.nan_to_num(v), -4194303, 4194303)).astype(jnp.int32)


def _levels(v, lo, hi):
  return jnp.clip(jnp.rint(v), F32(lo), F32(hi))


def _signed_absmax(x_NxK):
  """The value of largest magnitude per row, the first one on ties."""
  return jnp.take_along_axis(x_NxK, jnp.abs(x_NxK).argmax(-1)[:, None], -1)[:, 0]


def _f16(v):
  """float32 -> fp16 -> float32 (how a scale is stored and read back)."""
  return v.astype(jnp.float16).astype(jnp.float32)


# ---- 32-value blocks -------------------------------------------------------------------------

def _q8_0(x_Nx32):
  d_N = _div(jnp.abs(x_Nx32).max(-1), F32(127))
  v_Nx32 = x_Nx32 * _safe_div(F32(1), d_N)[:, None]
  t_Nx32 = jnp.trunc(v_Nx32)   # C's roundf: half away from zero
  q_Nx32 = t_Nx32 + jnp.sign(v_Nx32) * (jnp.abs(v_Nx32 - t_Nx32) >= 0.5)
  return _f16(d_N)[:, None] * q_Nx32.astype(jnp.int8).astype(F32)


def _offset_symmetric(x_Nx32, levels: int):
  """Q4_0 (16 levels) and Q5_0 (32): the signed extreme maps to -levels/2; d*(q - levels/2)."""
  half = levels // 2
  d_N = _div(_signed_absmax(x_Nx32), F32(-half))
  shifted_Nx32 = _opaque(x_Nx32 * _safe_div(F32(1), d_N)[:, None]) + F32(half + 0.5)
  q_Nx32 = jnp.minimum(levels - 1, jnp.trunc(shifted_Nx32).astype(jnp.int32))
  return _f16(d_N)[:, None] * (q_Nx32 - half).astype(F32)


def _q5_1(x_Nx32):
  """gguf's Q5_1 (the fallback of Q5_K): min-max over 32 levels, d*q + min."""
  hi_N, lo_N = x_Nx32.max(-1), x_Nx32.min(-1)
  d_N = _div(hi_N - lo_N, F32(31))
  v_Nx32 = _opaque((x_Nx32 - lo_N[:, None]) * _safe_div(F32(1), d_N)[:, None]) + F32(0.5)
  q_Nx32 = jnp.clip(jnp.trunc(v_Nx32).astype(jnp.int32), 0, 31)
  return _opaque(_f16(d_N)[:, None] * q_Nx32.astype(F32)) + _f16(lo_N)[:, None]


# ---- K-quants: Q4_K, Q5_K ---------------------------------------------------------------------

def _scale_min_search(x_32xM, nmax: int, rmin: float, rdelta: float, nstep: int):
  """Per sub-block (column): (scale, min, levels) with x ~ scale*level - min (llama.cpp's
  make_qkx2_quants; gguf_quants._scale_min_search states the rule)."""
  rms_M = jnp.sqrt(_div(_seq_sum(x_32xM * x_32xM), F32(32)))
  w_32xM = rms_M + jnp.abs(x_32xM)
  lo_M = jnp.minimum(x_32xM.min(0), F32(0))
  hi_M = x_32xM.max(0)
  flat_M = hi_M == lo_M
  sum_w_M, sum_x_M = _seq_sum(w_32xM), _seq_sum(w_32xM * x_32xM)

  def levels(numerator, min_M):
    iscale_M = _div(numerator, jnp.where(flat_M, F32(1), hi_M - min_M))
    return iscale_M, _levels(iscale_M * (x_32xM - min_M), 0, nmax)

  def error(scale_M, min_M, l_32xM):
    diff_32xM = _opaque(scale_M * l_32xM) + min_M - x_32xM
    return _seq_sum(w_32xM * (diff_32xM * diff_32xM))

  iscale_M, l_32xM = levels(F32(nmax), lo_M)
  scale_M = _div(F32(1), iscale_M)
  # The grids' level counts, in float32 as C computes them.
  numerators = F32(rmin) + F32(rdelta) * np.arange(nstep + 1, dtype=F32) + F32(nmax)

  def grid(step, carry):
    l_32xM, best_M, scale_M, min_M = carry
    _, trial_32xM = levels(jnp.asarray(numerators)[step], min_M)
    wl_32xM = w_32xM * trial_32xM
    sum_l_M, sum_l2_M = _seq_sum(wl_32xM), _seq_sum(wl_32xM * trial_32xM)
    sum_xl_M = _seq_sum(wl_32xM * x_32xM)
    det_M = _opaque(sum_w_M * sum_l2_M) - _opaque(sum_l_M * sum_l_M)
    trial_scale_M = _div(_opaque(sum_w_M * sum_xl_M) - _opaque(sum_x_M * sum_l_M), det_M)
    trial_min_M = _div(_opaque(sum_l2_M * sum_x_M) - _opaque(sum_l_M * sum_xl_M), det_M)
    positive_M = trial_min_M > 0    # a positive offset is refitted as scale only
    trial_min_M = jnp.where(positive_M, F32(0), trial_min_M)
    trial_scale_M = jnp.where(positive_M, _div(sum_xl_M, sum_l2_M), trial_scale_M)
    trial_err_M = error(trial_scale_M, trial_min_M, trial_32xM)
    better_M = (det_M > 0) & (trial_err_M < best_M)
    return (jnp.where(better_M, trial_32xM, l_32xM), jnp.where(better_M, trial_err_M, best_M),
            jnp.where(better_M, trial_scale_M, scale_M), jnp.where(better_M, trial_min_M, min_M))

  l_32xM, _, scale_M, min_M = jax.lax.fori_loop(
      0, nstep + 1, grid, (l_32xM, error(scale_M, lo_M, l_32xM), scale_M, lo_M))
  scale_M, min_M = jnp.where(flat_M, F32(0), scale_M), jnp.where(flat_M, lo_M, min_M)
  return scale_M, -min_M, jnp.where(flat_M, F32(0), l_32xM)


def _k_quant(x_Nx256, nmax: int, rmin: float, rdelta: float, nstep: int):
  """Q4_K (nmax 15) / Q5_K (31): 6-bit sub-block scales and mins under fp16 d and dmin."""
  N = x_Nx256.shape[0]
  scale_M, min_M, l_32xM = _scale_min_search(x_Nx256.reshape(N * 8, 32).T, nmax, rmin, rdelta,
                                             nstep)
  scale_Nx8, min_Nx8 = scale_M.reshape(N, 8), min_M.reshape(N, 8)
  max_scale_N = jnp.maximum(scale_Nx8.max(-1), F32(0))
  max_min_N = jnp.maximum(min_Nx8.max(-1), F32(0))

  def six_bits(max_N, v_Nx8):   # C stores the int in a uint8 (wrapping) before capping at 63
    inverse_N = _safe_div(F32(63), max_N)
    return jnp.minimum(63, _nearest_int(inverse_N[:, None] * v_Nx8) & 0xFF).astype(F32)

  d_Nx8 = _opaque(_f16(_div(max_scale_N, F32(63)))[:, None] * six_bits(max_scale_N, scale_Nx8))
  dm_Nx8 = _opaque(_f16(_div(max_min_N, F32(63)))[:, None] * six_bits(max_min_N, min_Nx8))
  # Levels again against the rounded header; sub-blocks whose scale rounds to 0 keep the search's.
  requant_Nx8x32 = jnp.clip(_nearest_int(_div(
      x_Nx256.reshape(N, 8, 32) + dm_Nx8[..., None],
      jnp.where(d_Nx8 != 0, d_Nx8, F32(1))[..., None])), 0, nmax)
  l_Nx8x32 = jnp.where(d_Nx8[..., None] != 0, requant_Nx8x32.astype(F32),
                       l_32xM.T.reshape(N, 8, 32))
  return (_opaque(d_Nx8[..., None] * l_Nx8x32) - dm_Nx8[..., None]).reshape(N, 256)


# ---- Q6_K: symmetric 6-bit levels per sub-block of 16, int8 scales under an fp16 d ------------

def _symmetric_search(x_16xM, nmax: int):
  """Per sub-block (column): (scale, levels + nmax) with x ~ scale*level (llama.cpp's
  make_qx_quants with x^2 weights; gguf_quants._symmetric_search states the rule)."""
  zero_M = jnp.abs(x_16xM).max(0) < _EPS
  extreme_M = jnp.where(zero_M, F32(1), _signed_absmax(x_16xM.T))
  w_16xM = x_16xM * x_16xM
  wx_16xM = w_16xM * x_16xM

  def fit(numerator):
    l_16xM = _levels(_div(numerator, extreme_M) * x_16xM, -nmax, nmax - 1)
    return l_16xM, _seq_sum(wx_16xM * l_16xM), _seq_sum(w_16xM * l_16xM * l_16xM)

  def ratio(n_M, d_M):
    return jnp.where(d_M != 0, _div(n_M, jnp.where(d_M != 0, d_M, F32(1))), F32(0))

  l_16xM, sumlx_M, suml2_M = fit(F32(-nmax))
  scale_M = ratio(sumlx_M, suml2_M)
  numerators = np.array([-(F32(nmax) + F32(0.1) * F32(step))
                         for step in (*range(-9, 0), *range(1, 10))], F32)

  def grid(i, carry):
    l_16xM, scale_M, best_M = carry
    trial_16xM, sumlx_M, suml2_M = fit(jnp.asarray(numerators)[i])
    better_M = (suml2_M > 0) & (sumlx_M * sumlx_M > best_M * suml2_M)
    scale_M = jnp.where(better_M, ratio(sumlx_M, suml2_M), scale_M)
    return (jnp.where(better_M, trial_16xM, l_16xM), scale_M,
            jnp.where(better_M, scale_M * sumlx_M, best_M))

  l_16xM, scale_M, _ = jax.lax.fori_loop(0, len(numerators), grid,
                                         (l_16xM, scale_M, scale_M * sumlx_M))
  return jnp.where(zero_M, F32(0), scale_M), jnp.where(zero_M, F32(0), l_16xM + F32(nmax))


def _q6_k(x_Nx256):
  N = x_Nx256.shape[0]
  scale_M, l_16xM = _symmetric_search(x_Nx256.reshape(N * 16, 16).T, nmax=32)
  scale_Nx16 = scale_M.reshape(N, 16)
  max_scale_N = _signed_absmax(scale_Nx16)
  zero_N = jnp.abs(max_scale_N) < _EPS
  # The signed largest scale maps to -128: int8 sub-block scales relative to d.
  iscale_N = jnp.where(zero_N, F32(0), _safe_div(F32(-128), max_scale_N))
  d_N = jnp.where(zero_N, F32(0), _safe_div(F32(1), iscale_N))
  sc_Nx16 = jnp.minimum(127, _nearest_int(iscale_N[:, None] * scale_Nx16)).astype(F32)
  dd_Nx16 = _f16(d_N)[:, None] * sc_Nx16
  requant_Nx16x16 = jnp.clip(_nearest_int(_div(
      x_Nx256.reshape(N, 16, 16), jnp.where(dd_Nx16 != 0, dd_Nx16, F32(1))[..., None])),
      -32, 31) + 32
  l_Nx16x16 = jnp.where(dd_Nx16[..., None] != 0, requant_Nx16x16.astype(F32),
                        l_16xM.T.reshape(N, 16, 16))
  # A block whose scales are all ~0 is written as zero bytes: d = 0, every level 0.
  l_Nx16x16 = jnp.where(zero_N[:, None, None], F32(0), l_Nx16x16)
  return (dd_Nx16[..., None] * (l_Nx16x16 - F32(32))).reshape(N, 256)


_FAKE_QUANTIZERS = {
    Q.F16: _f16,
    Q.Q8_0: _q8_0,
    Q.Q4_0: lambda x: _offset_symmetric(x, 16),
    Q.Q5_0: lambda x: _offset_symmetric(x, 32),
    Q.Q5_1: _q5_1,
    Q.Q4_K: lambda x: _k_quant(x, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20),
    Q.Q5_K: lambda x: _k_quant(x, nmax=31, rmin=-0.5, rdelta=0.1, nstep=15),
    Q.Q6_K: _q6_k,
}
TYPES = tuple(_FAKE_QUANTIZERS)


def block_size(qtype) -> int:
  """Values per block (F16 has none: 1)."""
  return 1 if qtype == Q.F16 else gguf.GGML_QUANT_SIZES[qtype][0]


def fake_quantize(x_Nxblock, qtype):
  """The values a GGUF file of `qtype` holds for the float32 blocks (rows) of x."""
  if qtype not in _FAKE_QUANTIZERS:
    raise ValueError(f'no fake quantizer for {Q(qtype).name}; have {[t.name for t in TYPES]}')
  return _FAKE_QUANTIZERS[qtype](jnp.asarray(x_Nxblock, jnp.float32))
