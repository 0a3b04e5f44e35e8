"""`make bench-device`: the one-shot accelerator check.

Runs, in one process on one device, (1) the benchmark's cases (experiments/bench/README.md) in
bf16 and (2) a realistic pair: a Qwen3-1.7B-shaped teacher distilled into a Qwen3-0.6B-shaped
student (random weights, vocabulary 151936, bf16 teacher params, bf16 compute with fp32 master
weights, rows of 2048 tokens = 1024 prompt + 1024 completion), off-policy ('supervised') and
on-policy ('gkd', λ=1: the student samples its 1024 completion tokens inside the step). Each
case prints one JSON line (the fields of `python -m distill.bench`, `pair` naming the shapes);
a case that fails (e.g. out of memory) prints a line with its `error` and the rest still run.
At the end a table of MFU, tokens/s and peak memory per case, with the goals beside:
off-policy MFU >= 45% on H100/H200-class GPUs; on-policy step <= 1.5x the off-policy step.

`--small` runs the same code at tiny shapes (what the test suite runs on CPU).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

from distill.bench import cases, cli, flops, timing
from distill.models import get_preset

GOAL_OFFPOLICY_MFU = 0.45
GOAL_ONPOLICY_RATIO = 1.5
BENCH_CASES = ('offpolicy_step', 'onpolicy_step', 'generate', 'loss_memory')
PAIR_CASES = ('offpolicy_step', 'onpolicy_step')


def pair_shapes(small: bool) -> cases.Shapes:
  """Qwen3-1.7B-like → Qwen3-0.6B-like at 2k tokens (tiny Qwen3-like ones with small)."""
  student = dict(dtype='bfloat16', remat=True)     # remat: 28 layers of 2k-token activations
  teacher = dict(dtype='bfloat16', param_dtype='bfloat16')
  if small:
    tiny = dict(n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, max_seq_len=64)
    return cases.Shapes(get_preset('qwen3-1.7b', 256, d_model=64, d_ff=128, **tiny, **teacher),
                        get_preset('qwen3-0.6b', 256, d_model=32, d_ff=64, **tiny, **student),
                        batch=2, prompt_len=8, completion_len=24, memory={}, matmul_n=256)
  vocab = 151_936
  return cases.Shapes(get_preset('qwen3-1.7b', vocab, **teacher),
                      get_preset('qwen3-0.6b', vocab, **student),
                      batch=8, prompt_len=1024, completion_len=1024, memory={}, matmul_n=4096)


def run_pair(args, env: dict, peak: float | None) -> list[dict]:
  shapes = pair_shapes(args.small)
  setup = cases.make_setup(shapes, args.chunk_size, args.seed)
  probe = timing.MatmulProbe(shapes.matmul_n)
  common = {**env, 'pair': 'qwen3-1.7b-like -> qwen3-0.6b-like', 'dtype': 'bfloat16',
            'small': args.small, 'steps': args.steps, 'batch': shapes.batch,
            'prompt_len': shapes.prompt_len, 'completion_len': shapes.completion_len,
            'chunk_size': args.chunk_size, 'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
            'device_peak_gflops': None if peak is None else peak / 1e9}
  rows = []
  for case in PAIR_CASES:
    row = {'case': case, **common}
    try:
      result = getattr(cases, case)(setup, args.steps, args.warmup, probe)
      row.update(loss=result['loss'], **cli.timed_fields(result, probe, peak))
    except Exception as e:   # one failing case (e.g. out of memory) must not end the check
      row['error'] = f'{type(e).__name__}: {e}'.splitlines()[0]
      traceback.print_exc()
    off = next((r for r in rows if r['case'] == 'offpolicy_step' and 'error' not in r), None)
    if case == 'onpolicy_step' and off and 'error' not in row:
      row['ratio_to_offpolicy_s'] = row['step_s_median'] / off['step_s_median']
    rows.append(row)
    emit(row, args.out)
  return rows


def emit(row: dict, out: str) -> None:
  if 'error' not in row:
    return cli.emit(row, out)
  line = json.dumps(row)
  print(line, flush=True)
  if out:
    with open(out, 'a') as f:
      f.write(line + '\n')


def summary(rows: list[dict]) -> str:
  """The table of every case, with the goals beside the figures they concern."""
  lines = ['| shapes | case | step s | tokens/s | MFU | compiled GiB | allocator peak GiB '
           '| goal |',
           '|---|---|---:|---:|---:|---:|---:|---|']
  for row in rows:
    shapes = row.get('pair', 'benchmark (bf16)')
    if 'error' in row:
      lines.append(f'| {shapes} | {row["case"]} | — | — | — | — | — | failed: {row["error"]} |')
      continue
    if row['case'] == 'loss_memory':
      lines.append(f'| {shapes} | loss_memory | — | — | — | '
                   f'{row["chunked_peak_bytes"] / 2**30:.2f} (plain '
                   f'{row["plain_peak_bytes"] / 2**30:.2f}) | — | chunked < 10% of plain |')
      continue
    mfu = row['mfu']
    # The allocator's peak is the process's so far (GPU/TPU only): a case's own or an earlier one's.
    allocator = (f'{row["peak_mem_bytes"] / 2**30:.2f}' if row['peak_mem_source'] == 'device'
                 else '—')
    goal = ''
    if row['case'] == 'offpolicy_step':
      goal = f'MFU >= {GOAL_OFFPOLICY_MFU:.0%} (H100/H200-class)'
    elif row['case'] == 'onpolicy_step' and row.get('ratio_to_offpolicy_s') is not None:
      goal = (f'<= {GOAL_ONPOLICY_RATIO}x off-policy step: '
              f'{row["ratio_to_offpolicy_s"]:.2f}x')
    lines.append(f'| {shapes} | {row["case"]} | {row["step_s_median"]:.4f} | '
                 f'{row["tokens_per_s"]:.0f} | {"—" if mfu is None else f"{mfu:.1%}"} | '
                 f'{row["compiled_mem_bytes"] / 2**30:.2f} | {allocator} | {goal} |')
  return '\n'.join(lines)


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(prog='python -m distill.bench.device',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--small', action='store_true', help='tiny shapes (the test suite)')
  parser.add_argument('--steps', type=int, default=3, help='timed steps per case (median)')
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--chunk_size', type=int, default=512, help='loss chunk of the steps')
  parser.add_argument('--out', default='', help='also append the JSON lines to this file')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  if args.steps < 1 or args.warmup < 0 or args.chunk_size < 0:
    parser.error('--steps must be >= 1, --warmup and --chunk_size >= 0')
  env = timing.environment()
  peak = None if env['platform'] == 'cpu' else flops.device_peak_flops(env['device_kind'],
                                                                        'bfloat16')
  bench_args = [f'--cases={",".join(BENCH_CASES)}', '--dtype=bfloat16', f'--steps={args.steps}',
                f'--warmup={args.warmup}', f'--chunk_size={args.chunk_size}',
                f'--seed={args.seed}'] + (['--small'] if args.small else []) + \
               ([f'--out={args.out}'] if args.out else [])
  rows = cli.run(cli.parse_args(bench_args))
  rows += run_pair(args, env, peak)
  print(summary(rows), file=sys.stderr, flush=True)
  return rows


if __name__ == '__main__':
  main()
