"""Block-by-block byte comparison of distill.models.gguf_quants with llama.cpp's own quantizer.

llama.cpp's libggml-base (shipped inside llama-cpp-python) exports ggml_quantize_chunk, the
function llama-quantize calls; without an importance matrix it runs the reference quantizers
(quantize_row_*_ref). This script feeds both the same float32 rows and counts identical blocks.

  python experiments/gguf_quant_parity/compare.py --lib PATH/libggml-base.so [--out result.json]
"""
from __future__ import annotations

import argparse
import ctypes
import json

import gguf
import numpy as np

from distill.models import gguf_quants

Q = gguf.GGMLQuantizationType
TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q5_0, Q.Q5_1)
ROWS, COLS = 64, 1024


def inputs_RxC(seed: int) -> dict[str, np.ndarray]:
  """Rows of float32 the quantizers have to survive, ROWS x COLS each."""
  rng = np.random.default_rng(seed)
  normal = rng.normal(size=(ROWS, COLS)).astype(np.float32)
  outliers = normal.copy()
  outliers.reshape(-1)[rng.choice(outliers.size, 64, replace=False)] *= 1000
  per_row_scale = normal * np.float32(10) ** rng.uniform(-6, 3, size=(ROWS, 1)).astype(np.float32)
  sparse = np.where(rng.random((ROWS, COLS)) < 0.9, 0, normal).astype(np.float32)
  return {
      'normal': normal,
      'student_t3': rng.standard_t(3, size=(ROWS, COLS)).astype(np.float32),
      'uniform_pos': rng.uniform(0, 1, size=(ROWS, COLS)).astype(np.float32),
      'negative_only': -np.abs(normal),
      'outliers_x1000': outliers,
      'row_scales_1e-6_1e3': per_row_scale,
      'sparse_90pct_zero': sparse,
      'constant_rows': np.repeat(rng.normal(size=(ROWS, 1)).astype(np.float32), COLS, 1),
      'zeros': np.zeros((ROWS, COLS), np.float32),
      'ties_small_ints': rng.integers(-8, 8, size=(ROWS, COLS)).astype(np.float32),
  }


def llama_cpp_quantize(lib, x_RxC: np.ndarray, qtype: Q) -> np.ndarray:
  size, nbytes = gguf.GGML_QUANT_SIZES[qtype]
  R, C = x_RxC.shape
  out = np.zeros((R, C // size * nbytes), np.uint8)
  src = np.ascontiguousarray(x_RxC, np.float32)
  written = lib.ggml_quantize_chunk(int(qtype), src.ctypes.data, out.ctypes.data, 0, R, C, None)
  assert written == out.nbytes, (written, out.nbytes)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--lib', required=True, help="llama.cpp's libggml-base shared library")
  p.add_argument('--seeds', type=int, default=3)
  p.add_argument('--out', default=None, help='write the per-type result as JSON')
  args = p.parse_args(argv)
  lib = ctypes.CDLL(args.lib)
  lib.ggml_quantize_chunk.restype = ctypes.c_size_t
  lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                      ctypes.c_void_p]
  result = {}
  for qtype in TYPES:
    nbytes = gguf.GGML_QUANT_SIZES[qtype][1]
    same = total = 0
    differing = {}
    for seed in range(args.seeds):
      for name, x_RxC in inputs_RxC(seed).items():
        ours = gguf_quants.quantize(x_RxC, qtype).reshape(-1, nbytes)
        theirs = llama_cpp_quantize(lib, x_RxC, qtype).reshape(-1, nbytes)
        equal_N = (ours == theirs).all(-1)
        same, total = same + int(equal_N.sum()), total + equal_N.size
        if not equal_N.all():
          differing[name] = differing.get(name, 0) + int((~equal_N).sum())
    result[qtype.name] = {'identical_blocks': same, 'blocks': total,
                          'differing_by_input': differing}
    print(f'{qtype.name:5s} {same}/{total} blocks identical' +
          (f'  differing: {differing}' if differing else ''))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
