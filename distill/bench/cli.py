"""`python -m distill.bench` (`make bench`): every benchmark case, one JSON line each.

What the cases measure and how to read the fields: experiments/bench/README.md.

    python -m distill.bench [--cases=offpolicy_step,onpolicy_step,generate,loss_memory]
        [--steps=5] [--warmup=1] [--small] [--dtype=float32|bfloat16] [--chunk_size=512]
        [--memory_chunk_size=0] [--out=FILE]

Lines go to stdout (and are appended to --out); a readable summary goes to stderr.
Fields of a timed case: step_s_median (and every timed step_s), tokens_per_s, gflop_per_step
(the FLOP convention of distill.bench.flops), gflops (achieved GFLOP/s), peak_fraction (achieved
FLOP/s over a 2048³ fp32 jitted matmul's; the matmul is timed before and after every timed step
and each step is measured against its neighbours, so load drift on a shared machine cancels;
step_in_matmuls is the median step time in matmul times, matmul_peak_gflops the matmul's median
rate), mfu (over the device's data-sheet peak for the compute dtype; GPU/TPU only; matmul figures
are kept there too), compile_s (first call, compilation included),
compiles_during_timed (XLA compilations while the timed steps ran: 0 unless something
recompiles), peak_mem_bytes with peak_mem_source ('device' allocator peak where the backend
reports one, else 'xla_memory_analysis' of the compiled step), plus versions and the device.
step_cpu_s_median is the process's CPU time per step (all threads; less sensitive to other
processes than wall time). onpolicy_step adds ratio_to_offpolicy (in matmul units: drift-corrected) and ratio_to_offpolicy_s
(in seconds). loss_memory compiles only (the plain form's footprint at full size is several
GB) and reports XLA's memory analysis: *_peak_bytes (arguments + outputs + temporaries), *_temp_bytes and ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from distill.bench import cases, flops, timing
from distill.models.config import DTYPES
from distill.train.config import base_config

CASES = ('offpolicy_step', 'onpolicy_step', 'generate', 'loss_memory')


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m distill.bench',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--cases', default=','.join(CASES),
                      help=f'comma-separated subset of {",".join(CASES)}')
  parser.add_argument('--steps', type=int, default=5, help='timed steps per case (median)')
  parser.add_argument('--warmup', type=int, default=1, help='untimed calls after compiling')
  parser.add_argument('--small', action='store_true', help='tiny shapes (for the harness test)')
  parser.add_argument('--dtype', default='float32', help=f'compute dtype, one of {DTYPES}')
  parser.add_argument('--chunk_size', type=int, default=base_config().loss.chunk_size,
                      help='loss chunk of the step cases (default: the config default); '
                      '0 = plain (unchunked) loss')
  parser.add_argument('--memory_chunk_size', type=int, default=0,
                      help='chunk of the chunked form in loss_memory; 0 = 256 (16 with --small)')
  parser.add_argument('--out', default='', help='also append the JSON lines to this file')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  # Bad input fails here, before anything is built or compiled.
  args.cases = [c.strip() for c in args.cases.split(',') if c.strip()]
  unknown = [c for c in args.cases if c not in CASES]
  if unknown or not args.cases:
    parser.error(f'unknown case(s) {unknown or args.cases}; valid cases: {", ".join(CASES)}')
  if args.steps < 1 or args.warmup < 0:
    parser.error(f'--steps must be >= 1 and --warmup >= 0, got {args.steps}, {args.warmup}')
  if args.dtype not in DTYPES:
    parser.error(f'--dtype must be one of {DTYPES}, got {args.dtype!r}')
  if args.chunk_size < 0 or args.memory_chunk_size < 0:
    parser.error(f'--chunk_size and --memory_chunk_size must be >= 0, got '
                 f'{args.chunk_size}, {args.memory_chunk_size}')
  return args


def timed_fields(result: dict, probe: timing.MatmulProbe, peak_flops: float | None) -> dict:
  t = result['timing']
  achieved = result['flop'] / t.median_s
  # Each step against the matmul timed around it, so that load drift cancels out.
  matmuls_per_step = statistics.median(s / r for s, r in zip(t.step_s, t.reference_s))
  memory = timing.device_peak_memory()
  return {
      'step_s_median': t.median_s, 'step_s': t.step_s,
      'step_cpu_s_median': statistics.median(t.cpu_s),
      'tokens_per_s': result['tokens'] / t.median_s,
      'gflop_per_step': result['flop'] / 1e9, 'gflops': achieved / 1e9,
      'matmul_peak_gflops': statistics.median(probe.flop / r for r in t.reference_s) / 1e9,
      'step_in_matmuls': matmuls_per_step,
      'peak_fraction': result['flop'] / (matmuls_per_step * probe.flop),
      'mfu': None if peak_flops is None else achieved / peak_flops,
      'compile_s': t.compile_s, 'compiles_during_timed': t.compiles_during_timed,
      'peak_mem_bytes': result['compiled_bytes'] if memory is None else memory,
      'peak_mem_source': 'xla_memory_analysis' if memory is None else 'device',
      'compiled_mem_bytes': result['compiled_bytes'],
  }


def run(args) -> list[dict]:
  """Runs the chosen cases, printing each line as soon as it is measured."""
  env = timing.environment()
  shapes = cases.make_shapes(args.small, args.dtype)
  # On CPU the table has no entry: the matmul ratio is the figure there.
  peak = None if env['platform'] == 'cpu' else flops.device_peak_flops(env['device_kind'],
                                                                        args.dtype)
  common = {**env, 'dtype': args.dtype, 'small': args.small, 'steps': args.steps,
            'warmup': args.warmup, 'chunk_size': args.chunk_size,
            'device_peak_gflops': None if peak is None else peak / 1e9,
            'batch': shapes.batch, 'prompt_len': shapes.prompt_len,
            'completion_len': shapes.completion_len,
            'time': time.strftime('%Y-%m-%dT%H:%M:%S%z')}
  setup = probe = None
  rows = []
  for case in args.cases:
    if case == 'loss_memory':   # compile-only: the plain form would not fit many machines
      start = time.perf_counter()
      row = cases.loss_memory(shapes, args.memory_chunk_size or shapes.memory['chunk'],
                              args.dtype)
      row['compile_s'] = time.perf_counter() - start
    else:
      setup = setup or cases.make_setup(shapes, args.chunk_size, args.seed)
      probe = probe or timing.MatmulProbe(shapes.matmul_n)
      result = getattr(cases, case)(setup, args.steps, args.warmup, probe)
      row = {'loss': result.get('loss'), **timed_fields(result, probe, peak)}
    row = {'case': case, **row, **common}
    if case == 'onpolicy_step':
      off = next((r for r in rows if r['case'] == 'offpolicy_step'), None)
      # In matmul units (drift-corrected), and in plain seconds.
      row['ratio_to_offpolicy'] = off and row['step_in_matmuls'] / off['step_in_matmuls']
      row['ratio_to_offpolicy_s'] = off and row['step_s_median'] / off['step_s_median']
    rows.append(row)
    emit(row, args.out)
  return rows


def emit(row: dict, out: str) -> None:
  line = json.dumps(row)
  print(line, flush=True)
  if out:
    with open(out, 'a') as f:
      f.write(line + '\n')
  if row['case'] == 'loss_memory':
    summary = (f'chunked {row["chunked_peak_bytes"] / 2**20:.0f} MiB vs plain '
               f'{row["plain_peak_bytes"] / 2**20:.0f} MiB ({100 * row["peak_ratio"]:.1f}%; '
               f'temp {100 * row["temp_ratio"]:.1f}%)')
  else:
    mfu = '' if row['mfu'] is None else f', MFU {100 * row["mfu"]:.1f}%'
    summary = (f'{row["step_s_median"]:.3f} s/step, {row["tokens_per_s"]:.0f} tok/s, '
               f'{row["gflops"]:.1f} GFLOP/s = {row["peak_fraction"]:.2f} of matmul peak{mfu}, '
               f'compile {row["compile_s"]:.1f} s, {row["compiles_during_timed"]} recompiles')
  print(f'[bench] {row["case"]}: {summary}', file=sys.stderr, flush=True)


def main(argv=None) -> list[dict]:
  return run(parse_args(argv))
