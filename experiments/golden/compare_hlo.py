"""Are two checkouts' benchmark steps the same program? Compiles `offpolicy_step` and
`onpolicy_step` (plain and chunked loss, the benchmark's shapes) in each and compares the
optimised HLO with names, source locations and debug tables removed.

  python experiments/golden/compare_hlo.py OTHER_CHECKOUT [--small]

Identical HLO means identical speed, so a refactor of the step's code needs no new
benchmark run; the same instructions in another order are reported as such, and any other
difference is printed (first lines of a unified diff).
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CASES = [('supervised', 0), ('supervised', 512), ('gkd', 0), ('gkd', 512)]

# Run inside a checkout: prints {case: optimised HLO text} as JSON.
_DUMP = '''
import json, sys
sys.path.insert(0, sys.argv[1])
from distill.bench import cases
shapes = cases.make_shapes(sys.argv[2] == 'small', 'float32')
out = {}
for name, chunk in json.loads(sys.argv[3]):
  setup = cases.make_setup(shapes, chunk_size=chunk)
  fn = cases.algorithm_step_fn(setup, name)
  out[f'{name}/{chunk}'] = fn.lower(setup.state, setup.run.teacher_params,
                                    setup.batch).compile().as_text()
print(json.dumps(out))
'''


def normalise(hlo: str) -> list[str]:
  """The program without what differs between equal programs: value and computation
  names, metadata, stack frames and the file/function tables."""
  lines = []
  for line in hlo.splitlines():
    if re.match(r'^\d+ ["{]', line) or line.startswith('HloModule') or not line.strip():
      continue
    line = re.sub(r', (metadata|backend_config)=\{.*?\}(?=,|$)', '', line)
    line = re.sub(r', stack_frame_id=\d+', '', line)
    line = re.sub(r'%[\w.-]+', '%v', line)
    line = re.sub(r'\b[\w.]+(?=: [a-z]\d*\[)', 'p', line)   # parameter names
    lines.append(line)
  return lines


def dump(checkout: str, small: bool) -> dict:
  proc = subprocess.run([sys.executable, '-c', _DUMP, os.path.abspath(checkout),
                         'small' if small else 'full', json.dumps(CASES)],
                        cwd='/', capture_output=True, text=True, check=True)
  return json.loads(proc.stdout.splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('other')
  parser.add_argument('--small', action='store_true')
  args = parser.parse_args()
  theirs, ours = dump(args.other, args.small), dump(REPO, args.small)
  different = 0
  for case in ours:
    a, b = normalise(theirs[case]), normalise(ours[case])
    if a == b:
      print(f'{case:16s} identical ({len(b)} HLO lines)')
      continue
    if sorted(a) == sorted(b):
      moved = sum(x != y for x, y in zip(a, b))
      print(f'{case:16s} same instructions ({len(b)} HLO lines), {moved} in another order')
      continue
    different += 1
    print(f'{case:16s} DIFFERENT ({len(a)} vs {len(b)} lines):')
    print('\n'.join(list(difflib.unified_diff(a, b, lineterm='', n=0))[:20]))
  sys.exit(1 if different else 0)


if __name__ == '__main__':
  main()
