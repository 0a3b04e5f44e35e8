"""GGUF block quantizers (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K) in numpy, vectorised over blocks.

Each one reproduces llama.cpp's reference quantisation (the one `llama-quantize` runs without an
importance matrix), so a tensor quantised here has the bytes llama.cpp would write for it. The
block layouts and search rules are llama.cpp's (ggml-common.h, ggml-quants.c); the code is ours.
Being bit-exact constrains the arithmetic:

* every value is float32, each C expression evaluated in C's order (`w*l*x` is `(w*l)*x`);
* sums over a block are sequential (`_seq_sum`), not numpy's pairwise sums, because the search
  compares errors and a different last bit can pick a different candidate scale; the searches
  hold sub-blocks as columns ([values, sub-blocks]) so those sums are vector adds;
* C's nearest_int (the 1.5*2^23 trick) rounds half to even, i.e. np.rint; roundf (Q8_0) rounds
  half away from zero; `(int8_t)f` truncates.

Layouts (bytes per block; fp16 scales are little-endian):
  Q8_0, 32 values:  d fp16 | 32 x int8.                                d*q
  Q4_0, 32 values:  d fp16 | 16 bytes, value j low nibble, j+16 high.   d*(q-8)
  Q4_K, 256 values: d, dmin fp16 | 12 bytes of 8 6-bit scales and mins | 128 bytes of nibbles.
  Q5_K, 256 values: as Q4_K, then 32 bytes of 5th bits before the nibbles.
  Q6_K, 256 values: 128 bytes low nibbles | 64 bytes high 2 bits | 16 x int8 scales | d fp16.
K-quant values are d*scale*q - dmin*min per sub-block of 32 (Q4_K/Q5_K) or d*scale*(q-32) per
sub-block of 16 (Q6_K).
"""
from __future__ import annotations

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
F32 = np.float32
# llama.cpp treats a group whose largest |value| is below this as all zeros.
GROUP_MAX_EPS = F32(1e-15)
# Values quantised per numpy pass, in 256-value super-blocks: bounds the temporaries (a few
# float32 arrays of this many super-blocks).
_CHUNK_BLOCKS = 8192


def _seq_sum(a_KxM: np.ndarray) -> np.ndarray:
  """Sum over the first axis in index order in float32, as C's `s += a[i]` loop does. Blocks
  lie along M, so each step is one vector add over all blocks."""
  total_M = a_KxM[0].astype(F32)
  for row_M in a_KxM[1:]:
    total_M = total_M + row_M
  return total_M


def _nearest_int(v: np.ndarray) -> np.ndarray:
  """C's nearest_int: round half to even. It is only valid for |v| <= 4194303 (it asserts);
  clipping there keeps extreme inputs finite, where llama.cpp's release build writes garbage."""
  return np.rint(np.clip(np.nan_to_num(v), -4194303, 4194303)).astype(np.int32)


def _levels(v: np.ndarray, lo: int, hi: int) -> np.ndarray:
  """clamp(nearest_int(v), lo, hi) as float32, for the searches' v, which are within a few units
  of [lo, hi] by construction (so nearest_int's range limit never applies)."""
  return np.clip(np.rint(v), F32(lo), F32(hi))


def _roundf(v: np.ndarray) -> np.ndarray:
  """C's roundf: half away from zero (v - trunc(v) is exact, so no float32 rounding slips in)."""
  t = np.trunc(v)
  return t + np.sign(v) * (np.abs(v - t) >= 0.5)


def _f16_bytes(v_N: np.ndarray) -> np.ndarray:
  return v_N.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _safe_div(n: float, d: np.ndarray) -> np.ndarray:
  """n/d, and 0 where d is 0 (C's `d ? n/d : 0`)."""
  return np.divide(F32(n), d, out=np.zeros_like(d), where=d != 0)


def _signed_absmax(x_NxK: np.ndarray) -> np.ndarray:
  """The value of largest magnitude, first one on ties (C keeps it on `amax < |v|` only)."""
  return np.take_along_axis(x_NxK, np.abs(x_NxK).argmax(-1)[:, None], -1)[:, 0]


# ---- 32-value blocks -------------------------------------------------------------------------

def _q8_0(x_Nx32: np.ndarray) -> np.ndarray:
  d_N = np.abs(x_Nx32).max(-1) / F32(127)
  q_Nx32 = _roundf(x_Nx32 * _safe_div(1, d_N)[:, None]).astype(np.int8)
  return np.concatenate([_f16_bytes(d_N), q_Nx32.view(np.uint8)], -1)


def _q4_0(x_Nx32: np.ndarray) -> np.ndarray:
  # The signed extreme maps to -8, so the 16 levels [-8, 7] are used asymmetrically in its favour.
  d_N = _signed_absmax(x_Nx32) / F32(-8)
  shifted_Nx32 = x_Nx32 * _safe_div(1, d_N)[:, None] + F32(8.5)
  q_Nx32 = np.minimum(15, np.trunc(shifted_Nx32).astype(np.int8)).astype(np.uint8)
  return np.concatenate([_f16_bytes(d_N), q_Nx32[:, :16] | (q_Nx32[:, 16:] << 4)], -1)


# ---- K-quants: scale/min search of 32-value sub-blocks (Q4_K, Q5_K) --------------------------

def _scale_min_search(x_32xM: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
  """Per sub-block (column) (scale, min, levels) with x ~ scale*level - min, level in [0, nmax].

  llama.cpp's make_qkx2_quants: weights |x| + rms(x) favour large values; start from the min-max
  fit, then try nstep+1 grids of nmax + rmin + rdelta*i levels over [min, max(x)], each followed
  by the weighted least-squares scale and min of its levels (min kept <= 0), and keep the grid
  with the smallest weighted squared error. `min` starts at min(x, 0) and becomes the best fit's
  min as the search goes: later grids are laid from there (the C code reuses the variable).
  """
  rms_M = np.sqrt(_seq_sum(x_32xM * x_32xM) / F32(32))
  w_32xM = rms_M + np.abs(x_32xM)
  lo_M = np.minimum(x_32xM.min(0), F32(0))
  hi_M = x_32xM.max(0)
  flat_M = hi_M == lo_M
  sum_w_M, sum_x_M = _seq_sum(w_32xM), _seq_sum(w_32xM * x_32xM)

  def levels(numerator: float, min_M):
    iscale_M = F32(numerator) / np.where(flat_M, F32(1), hi_M - min_M)
    return iscale_M, _levels(iscale_M * (x_32xM - min_M), 0, nmax)

  def error(scale_M, min_M, l_32xM):
    diff_32xM = scale_M * l_32xM + min_M - x_32xM
    return _seq_sum(w_32xM * (diff_32xM * diff_32xM))

  min_M = lo_M
  iscale_M, l_32xM = levels(F32(nmax), min_M)
  scale_M = F32(1) / iscale_M
  best_M = error(scale_M, min_M, l_32xM)
  with np.errstate(divide='ignore', invalid='ignore'):
    for step in range(nstep + 1):
      _, trial_32xM = levels(F32(rmin) + F32(rdelta) * F32(step) + F32(nmax), min_M)
      wl_32xM = w_32xM * trial_32xM
      sum_l_M, sum_l2_M = _seq_sum(wl_32xM), _seq_sum(wl_32xM * trial_32xM)
      sum_xl_M = _seq_sum(wl_32xM * x_32xM)
      det_M = sum_w_M * sum_l2_M - sum_l_M * sum_l_M
      trial_scale_M = (sum_w_M * sum_xl_M - sum_x_M * sum_l_M) / det_M
      trial_min_M = (sum_l2_M * sum_x_M - sum_l_M * sum_xl_M) / det_M
      positive_M = trial_min_M > 0    # a positive offset is refitted as scale only
      trial_min_M = np.where(positive_M, F32(0), trial_min_M)
      trial_scale_M = np.where(positive_M, sum_xl_M / sum_l2_M, trial_scale_M)
      trial_err_M = error(trial_scale_M, trial_min_M, trial_32xM)
      better_M = (det_M > 0) & (trial_err_M < best_M)
      l_32xM = np.where(better_M, trial_32xM, l_32xM)
      best_M = np.where(better_M, trial_err_M, best_M)
      scale_M = np.where(better_M, trial_scale_M, scale_M)
      min_M = np.where(better_M, trial_min_M, min_M)
  # A constant sub-block (lo == hi) is all level 0 with offset -lo.
  scale_M, min_M = np.where(flat_M, F32(0), scale_M), np.where(flat_M, lo_M, min_M)
  l_32xM = np.where(flat_M, F32(0), l_32xM)
  return scale_M, -min_M, l_32xM


def _k_scales(x_Nx256: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
  """Q4_K/Q5_K super-blocks: (16 header bytes — d, dmin as fp16 and 12 bytes of 6-bit scales
  and mins — [N, 16], levels [N, 256])."""
  N = x_Nx256.shape[0]
  x_32xM = np.ascontiguousarray(x_Nx256.reshape(N * 8, 32).T)
  scale_M, min_M, l_32xM = _scale_min_search(x_32xM, nmax, rmin, rdelta, nstep)
  scale_Nx8, min_Nx8 = scale_M.reshape(N, 8), min_M.reshape(N, 8)
  max_scale_N = np.maximum(scale_Nx8.max(-1), F32(0))
  max_min_N = np.maximum(min_Nx8.max(-1), F32(0))
  # 6-bit sub-block scales and mins relative to the largest; C stores the rounded int in a
  # uint8 (wrapping a negative one) before capping at 63.
  inv_scale_N, inv_min_N = _safe_div(63, max_scale_N), _safe_div(63, max_min_N)
  ls_Nx8 = np.minimum(63, _nearest_int(inv_scale_N[:, None] * scale_Nx8).astype(np.uint8))
  lm_Nx8 = np.minimum(63, _nearest_int(inv_min_N[:, None] * min_Nx8).astype(np.uint8))
  d_N = (max_scale_N / F32(63)).astype(np.float16)
  dmin_N = (max_min_N / F32(63)).astype(np.float16)
  # Sub-blocks 0-3 keep scale and min in the low 6 bits of bytes 0-3 and 4-7; sub-blocks 4-7
  # keep their low 4 bits in bytes 8-11 and their top 2 bits in the top of bytes 0-7.
  packed_Nx12 = np.concatenate([
      ls_Nx8[:, :4] | ((ls_Nx8[:, 4:] >> 4) << 6),
      lm_Nx8[:, :4] | ((lm_Nx8[:, 4:] >> 4) << 6),
      (ls_Nx8[:, 4:] & 0xF) | ((lm_Nx8[:, 4:] & 0xF) << 4)], -1)
  # Levels again against the rounded header; sub-blocks whose scale rounds to 0 keep the search's.
  d_Nx8 = d_N.astype(F32)[:, None] * ls_Nx8.astype(F32)
  dm_Nx8 = dmin_N.astype(F32)[:, None] * lm_Nx8.astype(F32)
  with np.errstate(divide='ignore', invalid='ignore'):
    requant_Nx8x32 = np.clip(_nearest_int(
        (x_Nx256.reshape(N, 8, 32) + dm_Nx8[..., None]) / d_Nx8[..., None]), 0, nmax)
  l_Nx8x32 = np.where(d_Nx8[..., None] != 0, requant_Nx8x32, l_32xM.T.reshape(N, 8, 32))
  header_Nx16 = np.concatenate([d_N.reshape(-1, 1).view(np.uint8),
                                dmin_N.reshape(-1, 1).view(np.uint8), packed_Nx12], -1)
  return header_Nx16, l_Nx8x32.reshape(N, 256).astype(np.uint8)


def _nibbles(l_Nx256: np.ndarray) -> np.ndarray:
  """128 bytes: per 64 values, byte i holds value i (low nibble) and value i+32 (high)."""
  l_Nx4x2x32 = l_Nx256.reshape(-1, 4, 2, 32) & 0xF
  return (l_Nx4x2x32[:, :, 0] | (l_Nx4x2x32[:, :, 1] << 4)).reshape(-1, 128)


def _q4_k(x_Nx256: np.ndarray) -> np.ndarray:
  header_Nx16, l_Nx256 = _k_scales(x_Nx256, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20)
  return np.concatenate([header_Nx16, _nibbles(l_Nx256)], -1)


def _q5_k(x_Nx256: np.ndarray) -> np.ndarray:
  header_Nx16, l_Nx256 = _k_scales(x_Nx256, nmax=31, rmin=-0.5, rdelta=0.1, nstep=15)
  # Fifth bits: bit k of byte i is the top bit of value 32k + i.
  top_Nx8x32 = (l_Nx256.reshape(-1, 8, 32) >> 4).astype(np.uint8)
  qh_Nx32 = np.bitwise_or.reduce(top_Nx8x32 << np.arange(8, dtype=np.uint8)[:, None], axis=1)
  return np.concatenate([header_Nx16, qh_Nx32, _nibbles(l_Nx256)], -1)


# ---- Q6_K: symmetric 6-bit levels per sub-block of 16 ----------------------------------------

def _symmetric_search(x_16xM: np.ndarray, nmax: int):
  """Per sub-block (column) (scale, levels + nmax) with x ~ scale*level, level in [-nmax, nmax-1].

  llama.cpp's make_qx_quants with x^2 weights: the signed extreme maps to -nmax, then 18 more
  grids of nmax +- 0.1*i levels are tried, each with its least-squares scale, keeping the one
  that explains the most weighted energy (largest sumlx^2 / suml2).
  """
  amax_M = np.abs(x_16xM).max(0)
  zero_M = amax_M < GROUP_MAX_EPS
  extreme_M = np.where(zero_M, F32(1), _signed_absmax(x_16xM.T))
  w_16xM = x_16xM * x_16xM
  wx_16xM = w_16xM * x_16xM

  def fit(iscale_M):
    l_16xM = _levels(iscale_M * x_16xM, -nmax, nmax - 1)
    return l_16xM, _seq_sum(wx_16xM * l_16xM), _seq_sum(w_16xM * l_16xM * l_16xM)

  l_16xM, sumlx_M, suml2_M = fit(F32(-nmax) / extreme_M)
  with np.errstate(divide='ignore', invalid='ignore'):
    scale_M = np.where(suml2_M != 0, sumlx_M / suml2_M, F32(0))
    best_M = scale_M * sumlx_M
    for step in (*range(-9, 0), *range(1, 10)):
      trial_16xM, sumlx_M, suml2_M = fit(-(F32(nmax) + F32(0.1) * F32(step)) / extreme_M)
      better_M = (suml2_M > 0) & (sumlx_M * sumlx_M > best_M * suml2_M)
      l_16xM = np.where(better_M, trial_16xM, l_16xM)
      scale_M = np.where(better_M, sumlx_M / suml2_M, scale_M)
      best_M = np.where(better_M, scale_M * sumlx_M, best_M)
  # An all-zero sub-block keeps stored level 0 (not the zero point nmax) and scale 0.
  scale_M = np.where(zero_M, F32(0), scale_M)
  l_16xM = np.where(zero_M, F32(0), l_16xM + F32(nmax))
  return scale_M, l_16xM


def _q6_k(x_Nx256: np.ndarray) -> np.ndarray:
  N = x_Nx256.shape[0]
  scale_M, l_16xM = _symmetric_search(np.ascontiguousarray(x_Nx256.reshape(N * 16, 16).T),
                                      nmax=32)
  scale_Nx16 = scale_M.reshape(N, 16)
  max_scale_N = _signed_absmax(scale_Nx16)
  zero_N = np.abs(max_scale_N) < GROUP_MAX_EPS
  with np.errstate(divide='ignore', invalid='ignore'):
    # The signed largest scale maps to -128: int8 sub-block scales relative to d.
    iscale_N = np.where(zero_N, F32(0), F32(-128) / max_scale_N)
    d_N = np.where(zero_N, F32(0), F32(1) / iscale_N).astype(np.float16)
    sc_Nx16 = np.minimum(127, _nearest_int(iscale_N[:, None] * scale_Nx16)).astype(np.int8)
    dd_Nx16 = d_N.astype(F32)[:, None] * sc_Nx16.astype(F32)
    requant_Nx16x16 = np.clip(_nearest_int(x_Nx256.reshape(N, 16, 16) / dd_Nx16[..., None]),
                              -32, 31) + 32
  l_Nx16x16 = np.where(dd_Nx16[..., None] != 0, requant_Nx16x16, l_16xM.T.reshape(N, 16, 16))
  # Per half of 128 values: ql byte i holds values i | i+64 and i+32 | i+96 (low nibbles);
  # qh byte i holds the top 2 bits of values i, i+32, i+64, i+96.
  l_Nx2x4x32 = l_Nx16x16.astype(np.uint8).reshape(N, 2, 4, 32)
  low_Nx2x4x32 = l_Nx2x4x32 & 0xF
  ql_Nx128 = (low_Nx2x4x32[:, :, 0:2] | (low_Nx2x4x32[:, :, 2:4] << 4)).reshape(N, 128)
  high_Nx2x4x32 = l_Nx2x4x32 >> 4
  qh_Nx64 = np.bitwise_or.reduce(
      high_Nx2x4x32 << (2 * np.arange(4, dtype=np.uint8))[:, None], axis=2).reshape(N, 64)
  block_Nx210 = np.concatenate([ql_Nx128, qh_Nx64, sc_Nx16.view(np.uint8),
                                d_N.reshape(-1, 1).view(np.uint8)], -1)
  # llama.cpp writes a block whose scales are all ~0 as 210 zero bytes.
  return np.where(zero_N[:, None], np.uint8(0), block_Nx210)


_BLOCK_QUANTIZERS = {Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}
# Types only reached as llama.cpp's fallbacks for rows that do not fit a 256-block (Q4_K -> Q5_0,
# Q5_K -> Q5_1); the gguf package's quantizers for these follow llama.cpp's reference.
_GGUF_QUANTIZED = (Q.Q5_0, Q.Q5_1)
TYPES = (*_BLOCK_QUANTIZERS, *_GGUF_QUANTIZED)


def block_size(qtype: Q) -> int:
  return gguf.GGML_QUANT_SIZES[qtype][0]


def quantize(x_RxC: np.ndarray, qtype: Q) -> np.ndarray:
  """Bytes [R, C / block * block bytes] (uint8) of float rows under `qtype`, llama.cpp's
  reference quantisation. C must be a multiple of the type's block size."""
  if qtype in _GGUF_QUANTIZED:
    return gguf.quants.quantize(np.asarray(x_RxC, F32), qtype)
  if qtype not in _BLOCK_QUANTIZERS:
    raise ValueError(f'no quantizer for {qtype.name}; have {[t.name for t in TYPES]}')
  size, nbytes = gguf.GGML_QUANT_SIZES[qtype]
  R, C = x_RxC.shape
  if C % size:
    raise ValueError(f'{qtype.name} needs rows that are a multiple of {size}, got {C}')
  x_Nxsize = np.ascontiguousarray(x_RxC, F32).reshape(-1, size)
  out_Nxbytes = np.empty((x_Nxsize.shape[0], nbytes), np.uint8)
  step = _CHUNK_BLOCKS * (256 // size)
  for start in range(0, x_Nxsize.shape[0], step):
    out_Nxbytes[start:start + step] = _BLOCK_QUANTIZERS[qtype](x_Nxsize[start:start + step])
  return out_Nxbytes.reshape(R, C // size * nbytes)
