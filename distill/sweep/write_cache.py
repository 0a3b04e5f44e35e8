"""`python -m distill.sweep.write_cache`: writes a run's teacher cache and nothing else.

Takes distill.main's flags (the run's exact command with the module swapped, as
`python -m distill.sweep --list` prints it), so a sweep writes every shared cache once
before the runs that read it start, and concurrent runs never race to write one.
"""
from __future__ import annotations

from absl import app, flags

from distill import main as main_lib   # defines --config, --workdir, --import
from distill.algorithms.cache_rows import CacheRows
from distill.train import run as run_lib
from distill.train import trainer


def write(config, workdir: str) -> dict:
  """Writes (or finishes, or reuses) the cache the run's rows read; returns its manifest."""
  run = run_lib.build_run(config, workdir)
  method = trainer.make_method(run)
  if not isinstance(method.rows, CacheRows):
    raise ValueError(f'algorithm {config.algorithm.name!r} reads no teacher cache')
  return method.rows.build_cache()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  main_lib.start_processes()
  write(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == '__main__':
  main_lib.run(main)
