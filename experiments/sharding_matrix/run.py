"""Every built-in method under every layout, with and without gradient accumulation, against
its own 1-device run: the exhaustive form of tests/test_sharding.py.

  .venv/bin/python experiments/sharding_matrix/run.py [--only gkd skd] \
      [--out=experiments/sharding_matrix/results.json]

(results.json and results.md are rewritten after each method; --only reruns some methods
and keeps the others' results.)

For each method, one process with 8 fake CPU devices (`python -m tests.sharding_runs METHOD
--accumulate`, XLA's backend optimisation off) trains 2 steps of the method's `:small` config
(tiny student and random teacher, the teacher laid out unlike the student) on 1 device, then
under data=8, fsdp=8, tensor=8 and 2x2x2, then under each layout again with
data.grad_accum_steps=2. Every run's per-step (loss, grad_norm) is compared with the 1-device
run's; results.json keeps the numbers, results.md the table of largest relative gaps.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tests.helpers import FAST_COMPILE  # noqa: E402  (the repository on the path first)
from tests.sharding_runs import METHODS  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RTOL = 2e-5    # tests/test_sharding.py's tolerance


def run_method(name: str) -> dict:
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': f'--xla_force_host_platform_device_count=8 {FAST_COMPILE}'}
  proc = subprocess.run([sys.executable, '-m', 'tests.sharding_runs', name, '--accumulate'],
                        cwd=REPO, env=env, capture_output=True, text=True)
  if proc.returncode:
    return {'error': proc.stderr[-3000:]}
  return json.loads(proc.stdout.splitlines()[-1])


def largest_gap(runs: dict, name: str) -> float:
  pairs = zip(sum(runs[name]['losses'], []), sum(runs['one']['losses'], []))
  return max(abs(a - b) / max(abs(b), 1e-12) for a, b in pairs)


def table(results: dict) -> str:
  columns = [c for c in next(r for r in results.values() if 'error' not in r) if c != 'one']
  lines = ['| method | ' + ' | '.join(columns) + ' |', '|---|' + '---|' * len(columns)]
  for method, runs in results.items():
    if 'error' in runs:
      lines.append(f'| {method} | ' + ' | '.join(['error'] * len(columns)) + ' |')
      continue
    cells = []
    for c in columns:
      gap = largest_gap(runs, c)
      cells.append(f'{gap:.1e}' + ('' if gap <= RTOL else ' **over**')
                   + ('' if runs[c]['teacher_differs'] else ' (teacher as student)'))
    lines.append(f'| {method} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def write(results: dict, seconds: dict, out: str) -> None:
  with open(out, 'w') as f:
    json.dump({'results': results, 'seconds': seconds}, f, indent=1, sort_keys=True)
  with open(os.path.splitext(out)[0] + '.md', 'w') as f:
    f.write(f'Largest relative gap of any step\'s loss or grad_norm to the 1-device run '
            f'(tolerance {RTOL:g}):\n\n{table(results)}\n')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--only', nargs='*', help='these methods only (the others\' results in '
                      '--out are kept)')
  parser.add_argument('--out', default=os.path.join(HERE, 'results.json'))
  args = parser.parse_args()
  results, seconds = {}, {}
  if args.only and os.path.exists(args.out):
    with open(args.out) as f:
      saved = json.load(f)
    results, seconds = saved['results'], saved['seconds']
  for name in args.only or METHODS:
    start = time.monotonic()
    results[name] = run_method(name)
    seconds[name] = round(time.monotonic() - start)
    print(f'{name}: {seconds[name]} s', 'error' if 'error' in results[name] else '', flush=True)
    write(results, seconds, args.out)    # after each method: a long run can be read early
  print(table(results))
  failed = [m for m, r in results.items() if 'error' in r or
            any(largest_gap(r, c) > RTOL for c in r if c != 'one')]
  sys.exit(1 if failed else 0)


if __name__ == '__main__':
  main()
