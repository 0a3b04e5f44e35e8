"""Peak memory of the plain vs the chunked loss (value and gradient), for `make bench`.

    python -m distill.losses.bench --vocab=128256 --batch=4 --seq=1024 --hidden=512

compiles both jitted value_and_grad functions from abstract shapes (nothing is allocated)
and reports XLA's `memory_analysis()`: temp bytes (the working set beyond inputs and
outputs) and arguments + outputs + temp (the whole footprint of one call).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from distill.losses import chunked, objective


def make_value_and_grad_fns(batch: int, seq: int, hidden: int, vocab: int, chunk_size: int,
                            token_fn=None, teacher_hidden: int | None = None,
                            dtype=jnp.float32):
  """(plain_fn, chunked_fn, abstract_args): jitted value_and_grad w.r.t. (student_h, W).

  Both functions take (student_h, student_W, teacher_h, teacher_W, targets, mask) and
  return (loss_sum, (d_student_h, d_student_W)); `abstract_args` are matching
  ShapeDtypeStructs (use them to lower/compile, or to build real inputs of those shapes).
  The default token_fn is forward KL.
  """
  token_fn = token_fn or objective.token_objective('forward_kl')
  teacher_hidden = teacher_hidden or hidden

  def plain(*args):
    return chunked.plain_loss(*args, token_fn)[0]

  def chunk(*args):
    return chunked.chunked_loss(*args, token_fn, chunk_size=chunk_size)[0]

  spec = jax.ShapeDtypeStruct
  abstract_args = (spec((batch, seq, hidden), dtype), spec((hidden, vocab), dtype),
                   spec((batch, seq, teacher_hidden), dtype), spec((teacher_hidden, vocab), dtype),
                   spec((batch, seq), jnp.int32), spec((batch, seq), jnp.float32))
  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
  return grad(plain), grad(chunk), abstract_args


def compiled_memory(fn, abstract_args) -> dict:
  """Bytes reported by the compiled executable's memory analysis."""
  stats = fn.lower(*abstract_args).compile().memory_analysis()
  out = {'temp': stats.temp_size_in_bytes, 'arguments': stats.argument_size_in_bytes,
         'outputs': stats.output_size_in_bytes}
  out['total'] = out['temp'] + out['arguments'] + out['outputs']
  return out


def memory_report(batch: int, seq: int, hidden: int, vocab: int, chunk_size: int) -> dict:
  """{'plain': bytes, 'chunked': bytes, 'temp_ratio', 'total_ratio'} for one configuration."""
  plain_fn, chunked_fn, args = make_value_and_grad_fns(batch, seq, hidden, vocab, chunk_size)
  plain, chunk = compiled_memory(plain_fn, args), compiled_memory(chunked_fn, args)
  return {'plain': plain, 'chunked': chunk, 'temp_ratio': chunk['temp'] / plain['temp'],
          'total_ratio': chunk['total'] / plain['total']}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--seq', type=int, default=1024)
  parser.add_argument('--hidden', type=int, default=512)
  parser.add_argument('--vocab', type=int, default=128256)
  parser.add_argument('--chunks', type=int, nargs='+', default=[1024, 512, 256])
  args = parser.parse_args(argv)
  mib = lambda n: f'{n / 2**20:9.1f} MiB'
  print(f'B={args.batch} T={args.seq} D={args.hidden} V={args.vocab} '
        f'on {jax.devices()[0].platform}')
  for chunk_size in args.chunks:
    r = memory_report(args.batch, args.seq, args.hidden, args.vocab, chunk_size)
    print(f'chunk {chunk_size:5d}: temp plain {mib(r["plain"]["temp"])} chunked '
          f'{mib(r["chunked"]["temp"])} ({100 * r["temp_ratio"]:.1f}%) | total plain '
          f'{mib(r["plain"]["total"])} chunked {mib(r["chunked"]["total"])} '
          f'({100 * r["total_ratio"]:.1f}%)')


if __name__ == '__main__':
  main()
