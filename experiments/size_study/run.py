"""The student-size study: methods × student sizes × seeds on the embedded tasks, one command.

    .venv/bin/python experiments/size_study/run.py --study_dir=workdirs/size_study
    (--small: a minutes-long smoke run of the same pipeline on tiny models)

Protocol (the GKD, DistiLLM and MiniLLM papers': distillation continues a supervised student):
  1. teachers   per task, `teacher-1m` on ground truth; on arithmetic also two more teacher
                sizes for the capacity-gap axis
  2. warm start per task, size and seed, the student on ground truth (config.py PRETRAIN_STEPS)
  3. lr grid    every method at LR_SIZE, seed 0, each learning rate of --lr_grid; the
                method's learning rate is the grid's best on held-out data (accuracy on
                arithmetic, cross-entropy on the true texts of the HMM language)
  4. main       every method × size × seed at its chosen learning rate, from the warm start
                of the same size and seed
  5. teachers   kd and gkd at LR_SIZE with each teacher size (arithmetic)
  6. hard       every method on 4-digit arithmetic at --hard_size (learning rates of step 3)
Runs are sweeps of experiments/size_study/config.py (distill.sweep's plans): each run's
directory holds its exact command, finished runs are skipped and interrupted ones resume, so
a killed study started again completes. --workers runs train side by side in processes.
Reports (distill.report: Markdown, CSV, plots) go to WORKDIR/report/<section>/ and
study.json records the learning rates chosen and each invocation's wall time; --report_only rebuilds them from the runs.
"""
from __future__ import annotations

import concurrent.futures
import functools
import importlib.util
import json
import multiprocessing
import os
import sys
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string('study_dir', 'workdirs/size_study', 'Runs and reports.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Student seeds.')
_SIZES = flags.DEFINE_list('sizes', ['student-15k', 'student-40k', 'student-100k',
                                     'student-500k'], 'Student presets.')
_TASKS = flags.DEFINE_list('tasks', ['arithmetic', 'hmm'], 'Tasks of the main grid.')
_METHODS = flags.DEFINE_list('methods', ['gt', 'kd', 'seqkd', 'gkd', 'distillm', 'onpolicy',
                                         'taid'], 'Methods (experiments/size_study/config.py).')
_LR_GRID = flags.DEFINE_list('lr_grid', ['1e-3', '3e-4', '1e-4'], 'Learning rates tried.')
_LR_SIZE = flags.DEFINE_string('lr_size', 'student-100k', 'The size the grid runs at.')
_AXIS_TEACHERS = flags.DEFINE_list('axis_teachers', ['student-500k', 'teacher-1m',
                                                     'student-2m'],
                                   'Teacher presets of the capacity-gap axis (arithmetic).')
_AXIS_METHODS = flags.DEFINE_list('axis_methods', ['kd', 'gkd', 'taid'],
                                   'Methods of that axis (TAID claims to close the gap).')
_HARD_SIZE = flags.DEFINE_string('hard_size', 'student-500k', 'Student of the 4-digit task.')
_WORKERS = flags.DEFINE_integer('workers', 2, 'Runs trained side by side.')
_SMALL = flags.DEFINE_bool('small', False, 'Tiny models, a few steps: a smoke run.')
_REPORT_ONLY = flags.DEFINE_bool('report_only', False, 'Rebuild the reports; train nothing.')

CONFIG_FILE = 'experiments/size_study/config.py'
_TEACHER = 'teacher-1m'   # config.py's TEACHER: the main grid's teacher
SELECT_BY = {'arithmetic': ('accuracy', max), 'hmm': ('ce', min)}
PARAMS_LABEL = {'student-500k': 'teacher-0.5m', 'teacher-1m': 'teacher-1m',
                'student-2m': 'teacher-2m'}


def _repo() -> str:
  return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Study:
  """Plans of the study's sections; every run's directory is fixed by its point."""

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.failures: list[str] = []

  def plan(self, method: str, task: str, points: list[dict], subdir: str = ''):
    from distill.sweep import plan as plan_lib
    arg = f'{method},{task}' + (',small' if _SMALL.value else '')
    invocation = plan_lib.Invocation(config_file=f'{CONFIG_FILE}:{arg}', overrides={},
                                     cwd=_repo())
    config = _config_module().get_config(arg)
    workdir = os.path.join(self.workdir, task, subdir or method)
    return plan_lib.make_plan(config, invocation, workdir, points)

  def teacher_dir(self, task: str, preset: str = _TEACHER) -> str:
    return _config_module().teacher_dir(task, preset, self.workdir)

  def warm_dir(self, task: str, size: str, seed: int) -> str:
    return _config_module().warm_dir(task, size, seed, self.workdir)

  def teacher_plans(self, tasks):
    plans = []
    for task in tasks:
      presets = [_TEACHER]
      if task == 'arithmetic':
        presets = list(dict.fromkeys(presets + _AXIS_TEACHERS.value))
      plans.append(self.plan('teacher', task, [{'model.preset': p} for p in presets]))
    return plans

  def warm_plans(self, tasks_sizes):
    from distill import sweep
    return [self.plan('pretrain', task, sweep.product(sweep.axis('model.preset', sizes),
                                                      sweep.axis('seed', self.seeds)))
            for task, sizes in tasks_sizes]

  @property
  def seeds(self) -> list[int]:
    return [int(s) for s in _SEEDS.value]

  def method_points(self, method: str, task: str, sizes, seeds, lrs,
                    teacher: str = _TEACHER) -> list[dict]:
    """Runs of a method continuing the warm start of their size and seed."""
    from distill.sweep import axes
    points = []
    for size in sizes:
      for seed in seeds:
        for lr in lrs:
          point = {'model.preset': size, 'seed': seed, 'optimizer.learning_rate': lr,
                   'model.init_from': axes.Labelled(self.warm_dir(task, size, seed), 'warm')}
          if method != 'gt':   # ground truth alone reads no teacher
            point['teacher.checkpoint'] = axes.Labelled(self.teacher_dir(task, teacher),
                                                        PARAMS_LABEL[teacher])
          points.append(point)
    return points


@functools.cache
def _config_module():
  """experiments/size_study/config.py (loaded by path, as distill.main loads a config file)."""
  spec = importlib.util.spec_from_file_location('size_study_config',
                                                os.path.join(_repo(), CONFIG_FILE))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _train_one(config, workdir: str, cache_only: bool) -> str:
  """In a worker process: trains one run (or writes one shared cache)."""
  if cache_only:
    from distill.sweep import write_cache
    write_cache.write(config, workdir)
  else:
    from distill.train import trainer
    trainer.train(config, workdir)
  return workdir


def execute(study: 'Study', plans, pool) -> None:
  """Shared caches first, then every pending run of the plans, side by side in the pool.
  A failed run does not stop the others: it is printed and kept in study.failures."""
  from distill.sweep import launch
  todo, writers = [], []
  for plan in plans:
    runs, plan_writers = launch.pending(plan)
    todo += runs
    writers += plan_writers
  for jobs, cache_only in ((writers, True), (todo, False)):
    futures = {pool.submit(_train_one, job.config, job.cache if cache_only else job.workdir,
                           cache_only): job for job in jobs}
    for i, future in enumerate(concurrent.futures.as_completed(futures)):
      job = futures[future]
      try:
        future.result()
        outcome = 'done'
      except Exception as e:   # reported with the run's directory; the study goes on
        outcome = f'FAILED: {type(e).__name__}: {e}'
        study.failures.append(f'{job.workdir}: {outcome}')
      print(f'study: {"cache" if cache_only else "run"} {i + 1}/{len(jobs)}: {job.workdir}: '
            f'{outcome}', flush=True)
  for plan in plans:
    launch.write_tables(plan)


def choose_lrs(study: Study, plans_by_method: dict, task: str) -> dict:
  """{method: (chosen lr, {lr: metric})}: the grid's best by the task's selection metric."""
  metric, best = SELECT_BY['hmm' if task == 'hmm' else 'arithmetic']
  choice = {}
  from distill.sweep import plan as plan_lib
  for method, plan in plans_by_method.items():
    records = {run.point['optimizer.learning_rate']:
               plan_lib.read_record(os.path.join(run.workdir, 'final_metrics.json'))
               for run in plan.runs}
    scores = {lr: record[metric] for lr, record in records.items() if record}
    if not scores:
      raise RuntimeError(f'no run of the {method} learning-rate grid on {task} finished')
    choice[method] = (best(scores, key=scores.get), scores)
  return choice


def grid_plans(study: Study, task: str) -> dict:
  lrs = [float(lr) for lr in _LR_GRID.value]
  return {m: study.plan(m, task, study.method_points(m, task, [_LR_SIZE.value],
                                                     study.seeds[:1], lrs))
          for m in _METHODS.value}


def lr_grid(study: Study, task: str, pool, train: bool) -> dict:
  plans = grid_plans(study, task)
  if train:
    execute(study, list(plans.values()), pool)
  return choose_lrs(study, plans, task)


def main_plans(study: Study, task: str, lrs: dict, sizes, methods, teacher=_TEACHER,
               subdir_suffix=''):
  return {m: study.plan(m, task, study.method_points(m, task, sizes, study.seeds, [lrs[m][0]],
                                                     teacher),
                        subdir=m + subdir_suffix)
          for m in methods}


def method_label(run, section: str) -> str:
  """A run's method as the study names it: its sweep directory's method, with the teacher on
  the teacher-size axis and the learning rate in the grid's report."""
  label = os.path.basename(os.path.dirname(run.path)).split('_')[0]
  if section.endswith('teacher_size'):
    preset = run.config['teacher.checkpoint'].rstrip('/').rsplit('model.preset=', 1)[-1]
    label += f' ← {PARAMS_LABEL[preset]}'
  if section.endswith('lr_grid'):
    label += f' lr={run.config["optimizer.learning_rate"]:g}'
  return label


def write_report(study: Study, section: str, plans) -> None:
  from distill import report
  run_dirs = [run.workdir for plan in plans for run in plan.runs
              if os.path.exists(os.path.join(run.workdir, 'final_metrics.json'))]
  if run_dirs:
    out = os.path.join(study.workdir, 'report', section)
    report.write_report(run_dirs, out, lambda run: method_label(run, section))
    print(f'study: report {out}', flush=True)


def main(argv):
  del argv
  import matplotlib
  matplotlib.use('Agg')
  start = time.time()
  study = Study(_WORKDIR.value)
  os.makedirs(study.workdir, exist_ok=True)
  train = not _REPORT_ONLY.value
  context = multiprocessing.get_context('spawn')
  tasks = _TASKS.value
  hard = 'arithmetic' in tasks and bool(_HARD_SIZE.value)
  with concurrent.futures.ProcessPoolExecutor(_WORKERS.value, mp_context=context) as pool:
    # 1-2. Teachers, then the warm starts.
    if train:
      execute(study, study.teacher_plans(tasks + (['arithmetic4'] if hard else [])), pool)
      sizes = list(dict.fromkeys(_SIZES.value + [_LR_SIZE.value]))
      warm = [(task, sizes) for task in tasks]
      if hard:
        warm.append(('arithmetic4', [_HARD_SIZE.value]))
      execute(study, study.warm_plans(warm), pool)
    sections, choices = {}, {}
    for task in tasks:
      # 3-4. The learning-rate grid, then the grid of sizes × seeds at the chosen rates.
      choices[task] = lr_grid(study, task, pool, train)
      plans = main_plans(study, task, choices[task], _SIZES.value, _METHODS.value)
      if train:
        execute(study, list(plans.values()), pool)
      sections[task] = list(plans.values())
      sections[f'{task}_lr_grid'] = list(grid_plans(study, task).values())
    if 'arithmetic' in tasks:
      # 5. The capacity-gap axis: the teacher's size for one student.
      axis = [main_plans(study, 'arithmetic', choices['arithmetic'], [_LR_SIZE.value],
                         _AXIS_METHODS.value, teacher, subdir_suffix=f'_{PARAMS_LABEL[teacher]}')
              for teacher in _AXIS_TEACHERS.value if teacher != _TEACHER]
      axis_plans = [p for plans in axis for p in plans.values()]
      if train:
        execute(study, axis_plans, pool)
      same_student = [p for p in sections['arithmetic']
                      if os.path.basename(p.workdir) in _AXIS_METHODS.value]
      sections['arithmetic_teacher_size'] = axis_plans + [
          _only(p, 'model.preset', _LR_SIZE.value) for p in same_student]
    if hard:
      # 6. Longer chains: 4-digit arithmetic, learning rates chosen on 2 digits.
      plans = main_plans(study, 'arithmetic4', choices['arithmetic'], [_HARD_SIZE.value],
                         _METHODS.value)
      if train:
        execute(study, list(plans.values()), pool)
      sections['arithmetic4'] = list(plans.values())
  for section, plans in sections.items():
    write_report(study, section, plans)
  path = os.path.join(study.workdir, 'report', 'study.json')
  invocations = []
  if os.path.exists(path):
    with open(path) as f:
      invocations = json.load(f)['invocations']
  invocations.append({'command': ' '.join([os.path.relpath(sys.executable)] + sys.argv),
                      'trained': train, 'wall_seconds': round(time.time() - start),
                      'finished_at': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})
  record = {'lr_choice': {t: {m: {'chosen': lr, 'grid': {str(k): v for k, v in grid.items()}}
                              for m, (lr, grid) in c.items()} for t, c in choices.items()},
            'selected_by': {t: SELECT_BY['hmm' if t == 'hmm' else 'arithmetic'][0]
                            for t in choices},
            'failed_runs': study.failures, 'invocations': invocations}
  with open(path, 'w') as f:
    json.dump(record, f, indent=1)
  print(json.dumps(record, indent=1))


def _only(plan, key: str, value):
  import dataclasses
  return dataclasses.replace(plan, runs=[r for r in plan.runs if r.point[key] == value])


if __name__ == '__main__':
  sys.path.insert(0, _repo())
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                        os.path.join(os.path.abspath(_repo()), 'workdirs', '.jax_cache'))
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  app.run(main)
