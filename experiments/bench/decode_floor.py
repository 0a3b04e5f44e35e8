"""How fast `generate` could be on this machine: the memory traffic of one decode step against
the rate at which this CPU streams it, next to the measured `generate`.

    .venv/bin/python experiments/bench/decode_floor.py [--rounds=5]

At batch 8 a decode step does ~27 FLOP per fp32 weight it reads (2 per row), so it is bound by
reading every matmul weight, the output projection and the whole KV cache once per step. The
script counts those bytes for the benchmark student (the shapes of README.md), measures two
streaming rates in this process — the output projection alone ([8, D] x [D, V] in a compiled
loop: the best-streaming kernel of the step) and a plain sum over a buffer of the step's size —
and prints the step time and tokens/s those rates allow, with `generate` timed in between
(same process, interleaved rounds; medians).
"""
import argparse
import math
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from distill import sampling
from distill.bench import cases
from distill.models import Transformer

_LOOP = 50   # iterations per compiled streaming loop


def _median_seconds(fn, *args, rounds):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def step_bytes(cfg, batch, cache_len) -> dict:
  """Bytes one decode step must read: matmul weights, output projection, KV cache (fp32)."""
  itemsize = jnp.dtype(cfg.dtype).itemsize
  D, F, L, Dh = cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.resolved_head_dim
  HD, KD = cfg.n_heads * Dh, cfg.n_kv_heads * Dh
  layer_weights = L * (D * HD + 2 * D * KD + HD * D + 3 * D * F) * itemsize
  projection = D * cfg.vocab_size * itemsize
  kv_cache = 2 * L * batch * KD * cache_len * itemsize   # attention reads every slot
  return {'layer_weights': layer_weights, 'output_projection': projection, 'kv_cache': kv_cache}


def projection_loop(h_BxD, w_DxV):
  """_LOOP dependent output projections (each feeds a sliver of its result to the next)."""
  def body(_, h):
    return h + (h @ w_DxV)[:, :h.shape[1]] * 1e-9
  return jax.lax.fori_loop(0, _LOOP, body, h_BxD)


def sum_loop(x):
  """_LOOP dependent sums over x (each scales x by a factor the previous sum sets)."""
  def body(_, acc):
    return acc + jnp.sum(x * (1 + acc * 1e-30))
  return jax.lax.fori_loop(0, _LOOP, body, jnp.zeros((), x.dtype))


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument('--rounds', type=int, default=5)
  args = parser.parse_args(argv)
  shapes = cases.make_shapes(False, 'float32')
  cfg, B, P, N = shapes.student, shapes.batch, shapes.prompt_len, shapes.completion_len
  parts = step_bytes(cfg, B, P + N)
  total = sum(parts.values())

  student = Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(student)
  generate = sampling.make_generate_fn(graphdef, sampling.SamplingConfig(max_new_tokens=N))
  prompt_BxP = jax.random.randint(jax.random.PRNGKey(1), (B, P), 0, cfg.vocab_size)
  mask_BxP = jnp.ones((B, P), jnp.int32)
  h_BxD = jax.random.normal(jax.random.PRNGKey(2), (B, cfg.d_model))
  w_DxV = student.output_projection().astype(jnp.float32)
  buffer = jnp.ones((math.ceil(total / 4),), jnp.float32)
  proj_fn, sum_fn = jax.jit(projection_loop), jax.jit(sum_loop)

  gen_s, proj_s, sum_s = [], [], []
  for r in range(args.rounds):
    gen_s.append(_median_seconds(generate, params, prompt_BxP, mask_BxP,
                                 jax.random.PRNGKey(r), rounds=1))
    proj_s.append(_median_seconds(proj_fn, h_BxD, w_DxV, rounds=3) / _LOOP)
    sum_s.append(_median_seconds(sum_fn, buffer, rounds=3) / _LOOP)
  gen, proj, summed = map(statistics.median, (gen_s, proj_s, sum_s))
  proj_rate = parts['output_projection'] / proj
  sum_rate = buffer.size * 4 / summed

  mib = lambda n: f'{n / 2**20:.1f} MiB'
  print(f'decode step reads (fp32, batch {B}, cache {P + N} slots): ' +
        ', '.join(f'{k} {mib(v)}' for k, v in parts.items()) + f'; total {mib(total)}')
  print(f'streaming rate: output projection {proj_rate / 1e9:.1f} GB/s ({proj * 1e3:.2f} ms), '
        f'sum over {mib(buffer.size * 4)} {sum_rate / 1e9:.1f} GB/s')
  for name, rate in (('projection', proj_rate), ('sum', sum_rate)):
    floor = total / rate
    print(f'floor at the {name} rate: {floor * 1e3:.2f} ms/step = {B / floor:.0f} tokens/s '
          '(reads only: no sampling, no elementwise work, no call overhead)')
  print(f'generate measured: {gen / N * 1e3:.2f} ms/step = {B * N / gen:.0f} tokens/s '
        f'({args.rounds} rounds, interleaved)')


if __name__ == '__main__':
  main()
