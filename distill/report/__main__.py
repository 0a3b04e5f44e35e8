"""`python -m distill.report DIR [DIR ...] [--out=DIR]`: report.md, report.csv and the plots
of every finished run under the directories (default --out: DIR/report for one directory).
Bad input (no finished runs, runs of different tasks) is refused before anything is written.
"""
from __future__ import annotations

import os
import sys

import matplotlib
from absl import app, flags

_OUT = flags.DEFINE_string('out', None, 'Where the report goes (default: DIR/report when one '
                           'DIR is given).')


def main(argv):
  directories = argv[1:]
  if not directories:
    raise app.UsageError('give the directories of the runs: python -m distill.report DIR ...')
  out = _OUT.value or (os.path.join(directories[0], 'report') if len(directories) == 1 else None)
  if out is None:
    raise app.UsageError('several directories: say where the report goes with --out=DIR')
  matplotlib.use('Agg')
  from distill import report
  try:
    written = report.write_report(directories, out)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print('\n'.join(written))


if __name__ == '__main__':
  app.run(main)
