"""`python -m distill.sweep`: distill.main's flags (--config, --workdir, --config.KEY=VALUE,
multi-host) plus --sweep=KEY=V1,V2,... (repeat the flag for more axes: their product runs)."""
from absl import app, flags

from distill import main as main_lib   # defines --config, --workdir and the multi-host flags
from distill.sweep import run as sweep_lib

_SWEEP = flags.DEFINE_multi_string('sweep', [], 'An axis, KEY=VALUE1,VALUE2,...; repeatable.')
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  main_lib.start_processes()
  axes = [sweep_lib.parse_axis(spec) for spec in _SWEEP.value]
  results = sweep_lib.run_sweep(FLAGS.config, FLAGS.workdir, axes)
  print(sweep_lib.markdown_table(results), end='')


if __name__ == '__main__':
  main_lib.run(main)
