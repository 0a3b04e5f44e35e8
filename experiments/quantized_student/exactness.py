"""QAD's fake quantization == the GGUF export, bit for bit, for every type and file type.

    python experiments/quantized_student/exactness.py \
        --out experiments/quantized_student/exactness.json

1. blocks: `distill.quant.blocks.fake_quantize` against `gguf.quants.dequantize` of
   `distill.models.gguf_quants.quantize` (llama.cpp's bytes), per block type, on ten kinds of
   rows (normal, Student-t(3), uniform, negative, rows scaled 1e-6..1e3, 90% zeros, constant,
   zeros, small integers (rounding ties), N(0, 0.02) like trained weights), 64 x 1024 each;
2. models: a random d_model-256 model (8 layers, so the _k_m mixes' layer rule applies)
   fake-quantized by distill.quant.student and exported by distill.models.gguf_export for each
   file type; every GGUF tensor dequantized against the step's weights.
Counts identical float32 bit patterns.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))

import gguf  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from distill.models import get_preset, gguf_arch, gguf_export, gguf_quants, sharded  # noqa: E402
from distill.quant import blocks, student  # noqa: E402

Q = gguf.GGMLQuantizationType


def row_kinds(rng, n=64, cols=1024) -> dict:
  shape = (n, cols)
  return {
      'normal': rng.normal(size=shape), 't3': rng.standard_t(3, size=shape),
      'uniform': rng.uniform(size=shape), 'negative': -rng.uniform(size=shape),
      'scaled_1e-6_1e3': rng.normal(size=shape) * np.logspace(-6, 3, n)[:, None],
      'sparse_90': rng.normal(size=shape) * (rng.uniform(size=shape) < 0.1),
      'constant': np.full(shape, 0.37), 'zeros': np.zeros(shape),
      'integers': rng.integers(-8, 8, size=shape).astype(float),
      'normal_0.02': rng.normal(size=shape) * 0.02}


def same_bits(a: np.ndarray, b: np.ndarray) -> int:
  return int((a.astype(np.float32).view(np.uint32) == b.astype(np.float32).view(np.uint32)).sum())


def check_blocks(seed: int) -> dict:
  out = {}
  kinds = row_kinds(np.random.default_rng(seed))
  for qtype in blocks.TYPES:
    size = 32 if qtype == Q.F16 else blocks.block_size(qtype)
    fn = jax.jit(lambda x, q=qtype: blocks.fake_quantize(x, q))
    same = total = 0
    for x in kinds.values():
      x = x.astype(np.float32)
      expected = (x.astype(np.float16).astype(np.float32) if qtype == Q.F16 else
                  gguf.quants.dequantize(gguf_quants.quantize(x, qtype), qtype).reshape(x.shape))
      got = np.asarray(fn(x.reshape(-1, size))).reshape(x.shape)
      same, total = same + same_bits(got, expected), total + x.size
    out[qtype.name] = {'identical_values': same, 'values': total}
  return out


def check_model() -> dict:
  cfg = dataclasses.replace(get_preset('tiny', vocab_size=40), d_model=256, d_ff=512, n_heads=4,
                            n_kv_heads=2, head_dim=64, n_layers=8)
  params = sharded.random_params(cfg, jax.random.PRNGKey(0))
  graphdef = sharded.abstract_model(cfg)[0]
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    for file_type in student.QUANT_TYPES:
      plan = student.quant_plan(cfg, file_type)
      start = time.time()
      quantized = jax.block_until_ready(
          jax.jit(lambda p: student.fake_quantize(plan, p))(params))
      seconds = time.time() - start
      path = os.path.join(tmp, f'{file_type}.gguf')
      written = gguf_export.export_gguf(nnx.merge(graphdef, params), path, file_type=file_type)
      trained = gguf_arch.gguf_tensors(quantized, cfg, 'llama')
      same = total = 0
      for tensor in gguf.GGUFReader(path).tensors:
        stored = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        same += same_bits(stored.reshape(trained[tensor.name].shape), trained[tensor.name])
        total += trained[tensor.name].size
      out[file_type] = {'identical_values': same, 'values': total,
                        'types': sorted(set(written.values())),
                        'jit_and_run_seconds': round(seconds, 2)}
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--out', required=True)
  p.add_argument('--seeds', type=int, default=2)
  args = p.parse_args()
  result = {'blocks': {f'seed{s}': check_blocks(s) for s in range(args.seeds)},
            'model_d256_8_layers': check_model(),
            'versions': {'jax': jax.__version__, 'numpy': np.__version__,
                         'gguf': getattr(gguf, '__version__', 'see pip')}}
  print(json.dumps(result, indent=1))
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
