"""`python -m distill.sweep`: distill.main's flags (--config, --workdir, --config.KEY=VALUE,
multi-host) plus --sweep=KEY=V1,V2,... (repeat the flag for more axes: their product runs)."""
import os
import sys

from absl import app, flags

from distill import main as main_lib   # defines --config, --workdir and the multi-host flags
from distill.sweep import run as sweep_lib

_SWEEP = flags.DEFINE_multi_string('sweep', [], 'An axis, KEY=VALUE1,VALUE2,...; repeatable.')
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.coordinator_address:
    import jax
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  axes = [sweep_lib.parse_axis(spec) for spec in _SWEEP.value]
  results = sweep_lib.run_sweep(FLAGS.config, FLAGS.workdir, axes)
  print(sweep_lib.markdown_table(results), end='')


if __name__ == '__main__':
  try:
    app.run(main)
  except main_lib.USER_ERRORS as e:   # as distill.main: the message, not a traceback
    if os.environ.get('DISTILL_TRACEBACK'):
      raise
    print(f'error: {e.args[0] if e.args else e}\n(set DISTILL_TRACEBACK=1 for the traceback)',
          file=sys.stderr)
    sys.exit(2)
