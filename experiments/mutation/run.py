"""The mutation pass: plant each one-line bug of mutants.py, run the tests that cover it.

    python -m experiments.mutation.run [--label=before] [--only ID ...] [--timeout=900]

Works on a git worktree of HEAD under /tmp (the checkout itself is never edited, and other
people's uncommitted edits never reach the run). For each mutant: the line is replaced in the
worktree, its bytecode removed, `pytest -x -q` runs the mutant's covering test files (its
`first` tests ahead of the rest, experiments/mutation/first.py), the outcome is recorded
(caught: a test failed or errored; survived: all passed; timeout: the run was killed after
--timeout seconds, counted apart), and the file is restored. The unmutated covering files run
once first (--baseline, on by default): a failing baseline would make every mutant look
caught, so the pass stops there.

The run is written to experiments/mutation/runs/LABEL.json and results.md is regenerated
from all recorded runs (experiments/mutation/report.py).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from experiments.mutation import report
from experiments.mutation.mutants import MUTANTS, Mutant

REPO = pathlib.Path(__file__).resolve().parents[2]
RUNS = pathlib.Path(__file__).resolve().parent / 'runs'


def apply(mutant: Mutant, text: str) -> str:
  """text with the mutant's line replaced; ValueError unless the line occurs exactly once."""
  lines = text.split('\n')
  hits = [i for i, line in enumerate(lines) if line.strip() == mutant.original.strip()]
  if len(hits) != 1:
    raise ValueError(f'mutant {mutant.id}: its original line occurs {len(hits)} times in '
                     f'{mutant.path} (must be once): {mutant.original!r}')
  line = lines[hits[0]]
  lines[hits[0]] = line[:len(line) - len(line.lstrip())] + mutant.mutated
  return '\n'.join(lines)


def _drop_bytecode(path: pathlib.Path) -> None:
  """A one-line edit can keep the source's size and mtime second: never trust a stale .pyc."""
  for pyc in (path.parent / '__pycache__').glob(f'{path.stem}.*.pyc'):
    pyc.unlink()


def _pytest(tree: pathlib.Path, tests, first, timeout: float) -> dict:
  # One persistent compilation cache for the CLI runs the tests start (tests/conftest.py), kept
  # across mutants: a program the mutant did not change compiles once for the whole pass, and
  # a changed one has another cache key.
  env = dict(os.environ, PYTHONPATH=str(tree), MUTATION_FIRST='\n'.join(first),
             DISTILL_TEST_COMPILE_CACHE=str(tree.parent / 'compile-cache'))
  cmd = [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider',
         '-p', 'experiments.mutation.first', *tests]
  start = time.perf_counter()
  # Its own session, so a timeout ends the CLI runs the tests start as well.
  proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
  try:
    out, _ = proc.communicate(timeout=timeout)
    rc = proc.returncode
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    rc = None
  seconds = time.perf_counter() - start
  failed = re.findall(r'^(?:FAILED|ERROR) (\S+)', out, re.M)
  summary = out.strip().splitlines()[-1] if out.strip() else ''
  return {'rc': rc, 'seconds': round(seconds, 1), 'failed': failed[0] if failed else '',
          'summary': summary, 'tail': out[-3000:]}


def outcome(result: dict) -> str:
  if result['rc'] is None:
    return 'timeout'
  if result['rc'] == 0:
    return 'survived'
  if result['rc'] in (1, 2):   # 1: a test failed; 2: interrupted, e.g. an import error
    return 'caught'
  raise RuntimeError(f'pytest ended with exit status {result["rc"]} (usage error or no tests '
                     f'collected): fix the mutant list\n{result["tail"]}')


def _worktree() -> pathlib.Path:
  tree = pathlib.Path(tempfile.mkdtemp(prefix='distill-mutation-')) / 'tree'
  subprocess.run(['git', 'worktree', 'add', '--detach', str(tree), 'HEAD'], cwd=REPO, check=True,
                 capture_output=True)
  (tree.parent / 'compile-cache').mkdir()
  return tree


def remove_worktree(tree: pathlib.Path) -> None:
  subprocess.run(['git', 'worktree', 'remove', '--force', str(tree)], cwd=REPO,
                 capture_output=True)
  shutil.rmtree(tree.parent, ignore_errors=True)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--label', default='before', help='the run is saved as runs/LABEL.json')
  parser.add_argument('--only', nargs='*', default=None, help='mutant ids (default: all)')
  parser.add_argument('--timeout', type=float, default=900, help='seconds per mutant')
  parser.add_argument('--no-baseline', dest='baseline', action='store_false')
  args = parser.parse_args(argv)

  mutants = [m for m in MUTANTS if args.only is None or m.id in args.only]
  unknown = set(args.only or ()) - {m.id for m in MUTANTS}
  if unknown:
    parser.error(f'unknown mutant ids: {sorted(unknown)}')
  started = time.perf_counter()
  tree = _worktree()
  commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=tree, check=True,
                          capture_output=True, text=True).stdout.strip()
  try:
    originals = {m.path: (tree / m.path).read_text() for m in mutants}
    for m in mutants:   # every mutant applies before anything runs
      apply(m, originals[m.path])
    record = {'label': args.label, 'commit': commit, 'argv': sys.argv[1:],
              'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
              'machine': f'{platform.machine()} Linux, {os.cpu_count()} CPUs, '
                         f'Python {platform.python_version()}',
              'timeout_s': args.timeout, 'results': {}}
    if args.baseline:
      tests = sorted({t for m in mutants for t in m.tests})
      base = _pytest(tree, tests, (), args.timeout * len(tests))
      record['baseline'] = {'tests': tests, **{k: base[k] for k in ('rc', 'seconds', 'summary')}}
      print(f'baseline {tests}: {base["summary"]} ({base["seconds"]} s)', flush=True)
      if base['rc'] != 0:
        raise SystemExit(f'the unmutated tests fail; no mutant was run:\n{base["tail"]}')
    for m in mutants:
      path = tree / m.path
      path.write_text(apply(m, originals[m.path]))
      _drop_bytecode(path)
      try:
        result = _pytest(tree, m.tests, m.first, args.timeout)
      finally:
        path.write_text(originals[m.path])
        _drop_bytecode(path)
      result['outcome'] = outcome(result)
      record['results'][m.id] = {k: result[k] for k in ('outcome', 'seconds', 'failed', 'summary')}
      print(f'{m.id}: {result["outcome"]} in {result["seconds"]} s {result["failed"]}',
            flush=True)
      _save(record, started, complete=False)   # a pass stopped early keeps what it found
    _save(record, started, complete=True)
  finally:
    remove_worktree(tree)
  print(f'{len(mutants)} mutants in {record["wall_s"]} s; runs/{args.label}.json, results.md')


def _save(record: dict, started: float, *, complete: bool) -> None:
  """Writes runs/LABEL.json and regenerates results.md."""
  record.update(wall_s=round(time.perf_counter() - started, 1), complete=complete)
  RUNS.mkdir(exist_ok=True)
  (RUNS / f'{record["label"]}.json').write_text(json.dumps(record, indent=1) + '\n')
  report.write()


if __name__ == '__main__':
  main()
