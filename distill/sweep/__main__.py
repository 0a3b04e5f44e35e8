"""`python -m distill.sweep`: distill.main's flags (--config, --workdir, --config.KEY=VALUE,
--import) plus:

  --sweep=KEY=V1,V2,...   an axis (repeatable), multiplied with the sweep the config file
                          declares in get_sweep(arg), if any
  --list                  print each run's command (a scheduler can launch them verbatim)
                          and train nothing
  --launcher=local|submitit, --submitit_cluster=slurm|local|debug (default: SLURM when
                          sbatch is found, else local), --launcher_param=KEY=VALUE
                          (repeatable; over the config file's get_launcher(arg))
"""
from __future__ import annotations

import importlib.util
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from distill import main as main_lib   # defines --config, --workdir, --import, multi-host
from distill.sweep import axes, launch, tables
from distill.sweep import plan as plan_lib
from distill.train import trainer

_SWEEP = flags.DEFINE_multi_string('sweep', [], 'An axis, KEY=VALUE1,VALUE2,...; repeatable.')
_LIST = flags.DEFINE_bool('list', False, "Print every run's command and train nothing.")
_LAUNCHER = flags.DEFINE_enum('launcher', 'local', launch.LAUNCHERS, 'Where the runs execute.')
_CLUSTER = flags.DEFINE_string('submitit_cluster', None,
                               'submitit cluster (slurm, local, debug); default: auto.')
_PARAMS = flags.DEFINE_multi_string('launcher_param', [],
                                    'submitit executor parameter KEY=VALUE; repeatable.')
FLAGS = flags.FLAGS


def _config_file_functions(config_file: str):
  """(get_sweep, get_launcher, arg) of the config file (None where it does not define one)."""
  path, _, arg = config_file.partition(':')
  spec = importlib.util.spec_from_file_location('_distill_sweep_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return getattr(module, 'get_sweep', None), getattr(module, 'get_launcher', None), arg or None


def _launcher_params(get_launcher, arg) -> dict:
  params = dict(get_launcher(arg)) if get_launcher else {}
  for spec in _PARAMS.value:
    key, sep, value = spec.partition('=')
    if not sep or not key:
      raise ValueError(f"--launcher_param is KEY=VALUE, got {spec!r}")
    params[key] = axes.typed(value, None)
  return params


def print_list(plan: plan_lib.Plan) -> None:
  print(f'# sweep {plan.workdir}: {len(plan.runs)} runs')
  if plan.cache_writers:
    print('# 1. shared teacher caches: write these before the runs that read them start')
    for writer in plan.cache_writers:
      print(plan.cache_command(writer))
    print('# 2. the runs, in any order or in parallel')
  for run in plan.runs:
    print(run.command)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  main_lib.start_processes()
  config_file = config_flags.get_config_filename(FLAGS['config'])
  get_sweep, get_launcher, arg = _config_file_functions(config_file)
  cli_axes = [axes.parse_axis(spec) for spec in _SWEEP.value]
  if get_sweep is None and not cli_axes:
    raise ValueError(f'nothing to sweep: {config_file} defines no get_sweep(arg) and no '
                     '--sweep=KEY=V1,V2 was given')
  points = axes.product(*([get_sweep(arg)] if get_sweep else []), *cli_axes)
  invocation = plan_lib.Invocation(
      config_file=config_file, overrides=config_flags.get_override_values(FLAGS['config']),
      imports=tuple(FLAGS['import'].value), cwd=os.getcwd())
  plan = plan_lib.make_plan(FLAGS.config, invocation, FLAGS.workdir, points)
  if _LIST.value:
    print_list(plan)
    return
  os.makedirs(plan.workdir, exist_ok=True)
  try:
    if _LAUNCHER.value == 'local':
      launch.run_local(plan, trainer.train)
    else:
      launch.run_submitit(plan, _CLUSTER.value, _launcher_params(get_launcher, arg))
  except launch.RunsFailed as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  finally:
    results = launch.write_tables(plan)
  print(tables.markdown_table(results), end='')


if __name__ == '__main__':
  main_lib.run(main)
