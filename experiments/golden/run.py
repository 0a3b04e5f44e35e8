"""Golden metrics: every algorithm's `:small` config trained from one fixed seed on CPU.

A refactor of the step or of an algorithm must leave these numbers unchanged (bit-identical
where the computation is the same) — compare two result files with `--compare`.

  python experiments/golden/run.py --out=experiments/golden/golden-<commit>.json
  python experiments/golden/run.py --compare A.json B.json

Each run goes through the CLI (`python -m distill.main`) from the repository root, so the
result is what a user gets. One small teacher is trained first and shared by all students.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (name, config:arg, needs the teacher)
RUNS = [
    ('scratch', 'configs/arithmetic_student.py:small,scratch', False),
    ('supervised', 'configs/arithmetic_student.py:small', True),
    ('seqkd', 'configs/arithmetic_seqkd.py:small', True),
    ('cached_teacher', 'configs/arithmetic_cached.py:small', True),
    ('hidden_kd', 'configs/arithmetic_hidden_kd.py:small', True),
    ('gkd', 'configs/arithmetic_gkd.py:small', True),
    ('distillm', 'configs/arithmetic_distillm.py:small', True),
    ('minillm', 'configs/arithmetic_minillm.py:small', True),
    ('onpolicy_rkl', 'configs/arithmetic_onpolicy_rkl.py:small', True),
    ('skd', 'configs/arithmetic_skd.py:small', True),
    ('taid', 'configs/arithmetic_taid.py:small', True),
]


def train(workdir: str, config: str, *flags: str) -> dict:
  cmd = [sys.executable, '-m', 'distill.main', f'--config={config}', f'--workdir={workdir}',
         '--config.wandb.mode=disabled', *flags]
  subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    final = json.load(f)
  # Timing fields differ run to run; everything else is a function of code and seed.
  curve = [{k: v for k, v in row.items() if k not in ('tokens_per_s', 'time')}
           for row in rows if 'loss' in row]
  return {'final': final, 'curve': curve}


def run_all(names: list[str] | None) -> dict:
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    teacher = os.path.join(tmp, 'teacher')
    results['teacher'] = train(teacher, 'configs/arithmetic_teacher.py:small')
    for name, config, needs_teacher in RUNS:
      if names and name not in names:
        continue
      flags = [f'--config.teacher.checkpoint={teacher}'] if needs_teacher else []
      print(f'{name} ...', flush=True)
      results[name] = train(os.path.join(tmp, name), config, *flags)
  return results


def compare(a: dict, b: dict) -> int:
  """Prints, per run, whether the two files agree bit for bit, else the largest relative gap."""
  worst = 0
  for name in sorted(set(a) | set(b)):
    if name not in a or name not in b:
      print(f'{name:16s} only in {"first" if name in a else "second"}')
      continue
    pairs = [(f'final/{k}', a[name]['final'][k], b[name]['final'].get(k))
             for k in a[name]['final']]
    for i, (ra, rb) in enumerate(zip(a[name]['curve'], b[name]['curve'])):
      pairs += [(f'step{ra.get("step", i)}/{k}', v, rb.get(k)) for k, v in ra.items()]
    gaps = [(abs(x - y) / max(abs(x), abs(y), 1e-12), key) for key, x, y in pairs
            if isinstance(x, (int, float)) and isinstance(y, (int, float)) and x != y]
    missing = [key for key, x, y in pairs if y is None]
    if not gaps and not missing:
      print(f'{name:16s} bit-identical ({len(pairs)} numbers)')
    else:
      gap, key = max(gaps) if gaps else (0.0, '-')
      print(f'{name:16s} {len(gaps)} of {len(pairs)} differ; largest relative gap {gap:.2e} '
            f'({key}){"; missing " + ", ".join(missing) if missing else ""}')
      worst = 1
  return worst


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out')
  parser.add_argument('--only', nargs='*', help='run only these names')
  parser.add_argument('--compare', nargs=2, metavar=('A', 'B'))
  args = parser.parse_args()
  if args.compare:
    loaded = []
    for path in args.compare:
      with open(path) as f:
        loaded.append(json.load(f))
    sys.exit(compare(*loaded))
  if not args.out:
    parser.error('--out is required unless --compare is given')
  results = run_all(args.only)
  with open(args.out, 'w') as f:
    json.dump(results, f, indent=1, sort_keys=True)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
