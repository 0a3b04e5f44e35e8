"""`make faults`: kills anywhere and torn state, with figures.

    python -m experiments.faults.run [--kills=10] [--seed=0] [--jobs=4] [--out=FILE]

1. Each data regime (supervised KD, cached teacher, SeqKD, GKD, DistiLLM with its replay
   buffer) runs once uninterrupted, then `--kills` times SIGKILLed at a seeded random point
   (experiments/faults/kills.py) and restarted to completion: the final params, metrics.jsonl
   and final_metrics.json must equal the uninterrupted run's bit for bit (CPU).
2. Torn and corrupt state (experiments/faults/corrupt.py): files of the newest checkpoint,
   of a teacher-cache shard, of a SeqKD generation shard, of a sweep's run records damaged;
   each run must finish as the intact one did, warning and naming what it skipped.
It prints every case as it ends, then the tables and the total wall time; --out also writes
them to FILE. Every run is a tiny CLI run (tests/helpers.run_cli: fast compilation, one
persistent compilation cache), `--jobs` at a time.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import shutil
import sys
import tempfile
import time

from experiments.faults import corrupt, kills
from tests.test_teacher_cache import export_random_teacher


def _print(lines: list[str], line: str) -> None:
  lines.append(line)
  print(line, flush=True)


def _kill_table(results: list[kills.KillResult]) -> list[str]:
  lines = ['| regime | kills tried | landed before the end | in a checkpoint save | '
           'in a cache / SeqKD build | identical finishes |', '|---|---|---|---|---|---|']
  for regime in kills.REGIMES:
    mine = [r for r in results if r.regime == regime.name]
    landed = [r for r in mine if r.landed]
    saves = sum('checkpoint save' in r.windows for r in landed)
    builds = sum('cache build' in r.windows for r in landed)
    shards = sum('shard files' in r.windows for r in landed)
    build = f'{builds} ({shards} inside a shard write)' if regime.shards else 'n/a'
    lines.append(f'| {regime.name} | {len(mine)} | {len(landed)} | {saves} | {build} | '
                 f'{sum(r.identical for r in mine)} |')
  total = len(results)
  lines.append(f'| all | {total} | {sum(r.landed for r in results)} | '
               f'{sum("checkpoint save" in r.windows for r in results)} | '
               f'{sum("cache build" in r.windows for r in results)} | '
               f'{sum(r.identical for r in results)} |')
  return lines


def _kill_line(r: kills.KillResult) -> str:
  where = ', '.join(r.windows) or ('elsewhere' if r.landed else 'the run had ended')
  verdict = 'identical' if r.identical else 'DIFFERENT: ' + '; '.join(r.problems)
  return f'kill {r.regime}: {r.point}: landed in {where}: {verdict}'


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m experiments.faults.run',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--kills', type=int, default=10, help='kills per data regime')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--jobs', type=int, default=4,
                      help='CLI runs at a time (more than the cores: a run waits on I/O too)')
  parser.add_argument('--out', default='', help='also write the figures to this file')
  parser.add_argument('--keep', action='store_true', help='keep the run folders')
  ns = parser.parse_args(argv)
  start, load_at_start = time.monotonic(), os.getloadavg()[0]
  root = tempfile.mkdtemp(prefix='distill-faults-')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  os.environ.setdefault('WANDB_MODE', 'disabled')
  os.environ.setdefault('DISTILL_TEST_COMPILE_CACHE', os.path.join(root, 'compile-cache'))
  lines: list[str] = []
  try:
    teacher = export_random_teacher(os.path.join(root, 'teacher'))
    with concurrent.futures.ThreadPoolExecutor(ns.jobs) as pool:
      refs = dict(zip(kills.REGIMES, pool.map(
          lambda r: kills.reference(r, teacher, os.path.join(root, r.name, 'reference')),
          kills.REGIMES)))
      for regime, (_, seconds) in refs.items():
        _print(lines, f'reference {regime.name}: {seconds:.1f} s uninterrupted')
      futures = []
      rngs = {regime: random.Random(f'{ns.seed}/{regime.name}') for regime in kills.REGIMES}
      for i in range(ns.kills):   # the regimes in turn: a suite stopped early covers them all
        for regime in kills.REGIMES:
          workdir = os.path.join(root, regime.name, f'kill{i}')
          point, kwargs = kills.kill_point(regime, i, rngs[regime], refs[regime][1], workdir)
          futures.append(pool.submit(kills.kill_and_finish, regime, teacher, workdir, point,
                                     kwargs, refs[regime][0]))
      results = []
      for future in concurrent.futures.as_completed(futures):
        results.append(future.result())
        _print(lines, _kill_line(results[-1]))
      cases = corrupt.run_all(pool, root, teacher, refs)
      for case in cases:
        _print(lines, corrupt.line(case))
  finally:
    if not ns.keep:
      shutil.rmtree(root, ignore_errors=True)
  wall = time.monotonic() - start
  summary = ['', '## Kills', '', *_kill_table(results), '', '## Torn and corrupt state', '',
             *corrupt.table(cases), '', f'total wall time: {wall / 60:.1f} min '
             f'({ns.kills} kills per regime, seed {ns.seed}, {ns.jobs} runs at a time; '
             f'{os.cpu_count()} cores, load average {load_at_start:.1f} at the start, '
             f'{os.getloadavg()[0]:.1f} at the end)']
  for line in summary:
    _print(lines, line)
  if ns.out:
    with open(ns.out, 'w') as f:
      f.write('\n'.join(lines) + '\n')
  failed = sum(not r.identical for r in results) + sum(not c.ok for c in cases)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
