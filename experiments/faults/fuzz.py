"""Fuzz figures: the test suite's fuzz cases with many more examples, each outcome counted.

    python -m experiments.faults.fuzz [--examples=500] [--seed=0] [--case_timeout=60] [--out=FILE]

Draws `--examples` cases of each kind in tests/fuzz_cases.py (config overrides, JSONL lines,
Parquet rows) with hypothesis and runs each case's check, counting how it ended: accepted (a
correct run was built / every example encoded), a clear error (naming the field, or the file
and line), an unclear error (a user error naming neither), a crash (any other exception, e.g.
from inside JAX or NumPy), a hang (past --case_timeout seconds) or unbuildable (Parquet rows
pyarrow cannot write; not counted as cases). Unlike the test, a failing case does not stop the
run and is not shrunk: the first few of each kind are printed as drawn.
"""
from __future__ import annotations

import argparse
import collections
import os
import signal
import sys
import tempfile
import time

from hypothesis import HealthCheck, Phase, given, reject, seed, settings

from tests import fuzz_cases as cases

UNCLEAR, CRASH, HANG = 'unclear error', 'crash', 'hang'
OUTCOMES = (cases.ACCEPTED, cases.CLEAR_ERROR, UNCLEAR, CRASH, HANG)
SHOWN_FAILURES = 3   # per kind and outcome


class CaseTimeout(Exception):
  pass


def _on_alarm(signum, frame):
  raise CaseTimeout


def _fuzz(strategy, check, *, examples: int, rng_seed: int, timeout_s: int):
  """(outcome counts, failing cases as drawn, (seconds, value) of the slowest case) over
  `examples` cases."""
  counts, failures, slowest = collections.Counter(), [], (0.0, None)

  @seed(rng_seed)
  @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
            suppress_health_check=list(HealthCheck))
  @given(value=strategy)
  def run(value):
    nonlocal slowest
    start, drawn = time.monotonic(), value
    signal.alarm(timeout_s)
    try:
      outcome = check(value)
    except CaseTimeout:
      outcome = HANG
    except AssertionError:
      outcome = UNCLEAR
    except Exception as e:  # noqa: BLE001 - a crash is what is being counted
      outcome, value = CRASH, (value, f'{type(e).__name__}: {e}')
    finally:
      signal.alarm(0)
    slowest = max(slowest, (time.monotonic() - start, drawn), key=lambda s: s[0])
    counts[outcome] += 1
    if outcome == cases.UNBUILDABLE:
      reject()   # hypothesis draws another case in its place
    if outcome not in (cases.ACCEPTED, cases.CLEAR_ERROR):
      if sum(f[0] == outcome for f in failures) < SHOWN_FAILURES:
        failures.append((outcome, value))

  run()
  return counts, failures, slowest


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m experiments.faults.fuzz',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--examples', type=int, default=500, help='cases of each kind')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--case_timeout', type=int, default=60,
                      help='seconds after which a case counts as a hang')
  parser.add_argument('--out', default='', help='also write the figures to this file')
  ns = parser.parse_args(argv)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  signal.signal(signal.SIGALRM, _on_alarm)
  start, load_at_start = time.monotonic(), os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as directory:
    kinds = {
        'config overrides': (cases.config_overrides, cases.check_config_overrides),
        'JSONL lines': (cases.jsonl_lines, lambda v: cases.check_jsonl_lines(v, directory)),
        'Parquet rows': (cases.parquet_rows, lambda v: cases.check_parquet_rows(v, directory)),
    }
    lines = ['| kind | cases run | ' + ' | '.join(OUTCOMES) + ' | slowest case |',
             '|---|' + '---|' * (len(OUTCOMES) + 2)]
    shown, failed = [], 0
    print('\n'.join(lines), flush=True)   # the table's rows as each kind ends
    for name, (strategy, check) in kinds.items():
      counts, failures, slowest = _fuzz(strategy, check, examples=ns.examples,
                                        rng_seed=ns.seed, timeout_s=ns.case_timeout)
      run = sum(counts[o] for o in OUTCOMES)
      failed += sum(counts[o] for o in (UNCLEAR, CRASH, HANG))
      lines.append(f'| {name} | {run} | ' + ' | '.join(str(counts[o]) for o in OUTCOMES)
                   + f' | {slowest[0]:.2f} s |')
      shown.append(f'{name}: slowest case ({slowest[0]:.2f} s): {slowest[1]!r}')
      if counts[cases.UNBUILDABLE]:
        shown.append(f'{name}: {counts[cases.UNBUILDABLE]} drawn cases pyarrow cannot write '
                     'were set aside (not counted)')
      shown += [f'{name}: {outcome}: {value!r}' for outcome, value in failures]
      print(lines[-1], flush=True)
  lines += ['', *shown, '', f'total wall time: {(time.monotonic() - start) / 60:.1f} min '
            f'({ns.examples} examples per kind, seed {ns.seed}; {os.cpu_count()} cores, load '
            f'average {load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end)']
  print('\n'.join(lines[2 + len(kinds):]))
  if ns.out:
    with open(ns.out, 'w') as f:
      f.write('\n'.join(lines) + '\n')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
