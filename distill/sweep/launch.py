"""Launchers: where a plan's runs execute. Both write shared caches first and skip finished runs.

  local     in this process, one run after another (a killed sweep started again resumes
            the interrupted run from its checkpoint and skips the finished ones)
  submitit  each run's command as a submitit job: SLURM on a cluster (a job array,
            `slurm_array_parallelism` limiting how many run at once), or submitit's local
            executor here (all at once, as subprocesses). The cache writers run as jobs
            first and the runs are submitted once they are done.

Executor parameters (timeout_min, gpus_per_node, cpus_per_task, mem_gb, slurm_partition,
slurm_array_parallelism, slurm_additional_parameters, ...) come from the config file's
`get_launcher(arg)` and `--launcher_param=KEY=VALUE`; parameters of another cluster are
ignored by submitit, so one config serves SLURM and the local executor.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable

import jax

from distill.sweep import plan as plan_lib
from distill.sweep import tables, write_cache

LAUNCHERS = ('local', 'submitit')


class RunsFailed(RuntimeError):
  """Some jobs of the sweep failed (their logs are named)."""


def pending(plan: plan_lib.Plan) -> tuple[list[plan_lib.Run], list[plan_lib.Run]]:
  """(runs to train, cache writers they need). Every run directory is checked first, so a
  directory holding another config is refused before anything starts."""
  states = {run.name: run.state() for run in plan.runs}
  for run in plan.runs:
    if states[run.name] == 'finished':
      print(f'sweep: {run.name}: finished, skipped', flush=True)
  todo = [run for run in plan.runs if states[run.name] != 'finished']
  needed = {run.cache for run in todo}
  return todo, [w for w in plan.cache_writers if w.cache in needed]


@contextlib.contextmanager
def _wandb_tags(tags):
  """WANDB_TAGS for an in-process run (a command sets it in its environment)."""
  previous = os.environ.get('WANDB_TAGS')
  os.environ['WANDB_TAGS'] = ','.join(tags)
  try:
    yield
  finally:
    if previous is None:
      os.environ.pop('WANDB_TAGS', None)
    else:
      os.environ['WANDB_TAGS'] = previous


def run_local(plan: plan_lib.Plan, train: Callable[[object, str], dict]) -> None:
  """Trains the runs in turn; after each, WORKDIR/results.* hold the table so far."""
  todo, writers = pending(plan)
  for writer in writers:
    print(f'sweep: shared cache {writer.cache}', flush=True)
    write_cache.write(writer.config, writer.workdir)
  for i, run in enumerate(todo):
    print(f'sweep: run {i + 1}/{len(todo)}: {run.name}', flush=True)
    with _wandb_tags(run.tags):
      train(run.config, run.workdir)
    write_tables(plan)


def write_tables(plan: plan_lib.Plan) -> list[dict]:
  """WORKDIR/results.json and results.md of the finished runs (process 0 writes)."""
  results = tables.collect(plan.runs)
  if results and jax.process_index() == 0:
    tables.write_tables(plan.workdir, results)
  return results


def run_submitit(plan: plan_lib.Plan, cluster: str | None, parameters: dict) -> None:
  import submitit
  executor = submitit.AutoExecutor(folder=os.path.join(plan.workdir, 'submitit'),
                                   cluster=cluster)
  executor.update_parameters(**{'name': os.path.basename(plan.workdir), **parameters})
  todo, writers = pending(plan)
  _submit_and_wait(executor, [plan.cache_command(w) for w in writers])
  _submit_and_wait(executor, [run.command for run in todo])


def _submit_and_wait(executor, lines: list[str]) -> None:
  import submitit
  if not lines:
    return
  with executor.batch():   # one job array on SLURM
    jobs = [executor.submit(submitit.helpers.CommandFunction(['bash', '-c', line]))
            for line in lines]
  print(f'sweep: submitted {len(jobs)} job(s) to {executor.cluster}: '
        f'{", ".join(j.job_id for j in jobs)}', flush=True)
  failures = []
  for line, job in zip(lines, jobs):
    try:
      job.result()
    except Exception as e:  # noqa: BLE001 - every failure is reported, then raised together
      failures.append(f'{line}\n  {type(e).__name__}; log: {job.paths.stderr}')
  if failures:
    raise RunsFailed(f'{len(failures)} of {len(jobs)} job(s) failed:\n' + '\n'.join(failures))
