"""Sweeps: points from axes, products and zips; bad input refused by name; caches shared only
where valid and written first; and from the CLI a declared 2 sizes x 2 losses sweep killed
mid-run (SIGKILL) and restarted completes with every run exactly once, a command printed by
--list runs verbatim, and submitit's local executor runs a sweep."""
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from distill import report, sweep
from distill.sweep import tables
from distill.sweep import plan as plan_lib
from tests.helpers import REPO, cli_env, read_metrics, run_cli, small_config
from tests.test_teacher_cache import export_random_teacher

INVOCATION = plan_lib.Invocation('configs/arithmetic_cached.py:small', {})


def test_products_and_zips_expand_to_typed_runs(tmp_path):
  config = small_config('arithmetic_cached')
  points = sweep.product(sweep.parse_axis('model.d_model=16,32'),
                         sweep.zip_axes(sweep.axis('loss.kd_weight', [1, 0.25]),
                                        sweep.parse_axis('eval.generate=true,false')),
                         sweep.axis('model.init_from', ['/a/b'], labels=['warm']))
  plan = sweep.make_plan(config, INVOCATION, str(tmp_path), points)
  assert [r.name for r in plan.runs] == [
      f'model.d_model={d},loss.kd_weight={w},eval.generate={g},model.init_from=warm'
      for d in (16, 32) for w, g in (('1', 'true'), ('0.25', 'false'))]
  last = plan.runs[-1]
  assert last.overrides == {'model.d_model': '32', 'loss.kd_weight': '0.25',
                            'eval.generate': 'false', 'model.init_from': 'warm'}
  assert last.config.model.d_model == 32 and last.config.loss.kd_weight == 0.25
  assert last.config.eval.generate is False and plan.runs[0].config.eval.generate is True
  assert last.config.model.init_from == '/a/b'
  assert isinstance(plan.runs[0].config.loss.kd_weight, float)
  assert last.workdir == str(tmp_path / last.name)
  assert last.config.wandb.group == tmp_path.name and last.config.wandb.name == last.name
  assert last.tags == tuple(f'{k}={v}' for k, v in last.overrides.items())
  assert config.model.d_model is None and config.loss.kd_weight == 0.5   # base untouched


@pytest.mark.parametrize('make_points, message', [
    (lambda: [sweep.parse_axis('model.d_model')], "'key=value1,value2,...'"),
    (lambda: [sweep.parse_axis('model.d_model=16,,32')], "'key=value1,value2,...'"),
    (lambda: [sweep.parse_axis('model.init_from=a/b')], 'give the axis labels'),
    (lambda: [sweep.parse_axis('seed=1,1')], 'repeats a value'),
    (lambda: [sweep.axis('seed', [])], 'has no values'),
    (lambda: [sweep.axis('seed', [1, 2], labels=['a'])], '1 labels for 2 values'),
    (lambda: [sweep.parse_axis('seed=1'), sweep.parse_axis('seed=2')], 'appear in two'),
    (lambda: [[]], 'the product is empty'),
    (lambda: [sweep.zip_axes(sweep.parse_axis('seed=1,2'), sweep.parse_axis('model.d_model=8'))],
     'same number of points'),
    (lambda: [sweep.parse_axis('total_step=1,2')], 'did you mean total_steps'),
    (lambda: [sweep.parse_axis('model.d_modl=8')],
     "model has no field 'd_modl' (did you mean d_model"),
    (lambda: [sweep.parse_axis('algorithm.kwargs.kk=1')], 'did you mean k'),
    (lambda: [sweep.parse_axis('total_steps=1.5')], 'sweep value for total_steps'),
    (lambda: [sweep.parse_axis('eval.generate=maybe')], 'expected true or false'),
])
def test_bad_sweeps_are_refused_by_name(tmp_path, make_points, message):
  with pytest.raises(ValueError) as error:
    sweep.make_plan(small_config('arithmetic_cached'), INVOCATION, str(tmp_path),
                    sweep.product(*make_points()))
  assert message in str(error.value), error.value


def test_runs_sharing_a_directory_or_a_command_line_field_are_refused(tmp_path):
  config = small_config('arithmetic_cached')
  with pytest.raises(ValueError, match="two points of the sweep map to one run directory 'seed=1'"):
    sweep.make_plan(config, INVOCATION, str(tmp_path), [{'seed': 1}, {'seed': '1'}])
  with pytest.raises(ValueError, match='--config.seed and the sweep both set'):
    sweep.make_plan(config, plan_lib.Invocation('c.py', {'seed': 3}), str(tmp_path),
                    sweep.parse_axis('seed=1,2'))


def test_a_directory_holding_another_config_is_refused_and_kept(tmp_path):
  plan = sweep.make_plan(small_config('arithmetic_cached'), INVOCATION, str(tmp_path),
                         sweep.parse_axis('seed=1,2'))
  run = plan.runs[0]
  assert run.state() == 'new'
  os.makedirs(run.workdir)
  saved = json.loads(run.config.to_json_best_effort())
  saved['total_steps'] += 1
  saved['progress_bar'] = True                     # ignored: does not change results
  with open(os.path.join(run.workdir, 'config.json'), 'w') as f:
    json.dump(saved, f)
  with pytest.raises(ValueError, match=r'holds a run with another config \(total_steps: 7 → 6\)'):
    run.state()
  saved['total_steps'] -= 1
  del saved['task']['prompt_len']                  # a field the run predates, at its default
  with open(os.path.join(run.workdir, 'config.json'), 'w') as f:
    json.dump(saved, f)
  assert run.state() == 'interrupted'


@pytest.mark.parametrize('config_name, axis, caches', [
    ('arithmetic_cached', 'model.d_model=16,32', ['cached_teacher_cache'] * 2),
    ('arithmetic_seqkd', 'loss.ce_weight=1,2', ['seqkd_cache'] * 2),
    ('arithmetic_cached', 'algorithm.kwargs.k=4,8',               # the cache depends on k
     ['cached_teacher_cache,algorithm.kwargs.k=4', 'cached_teacher_cache,algorithm.kwargs.k=8']),
    ('arithmetic_cached', 'seed=0,1',
     ['cached_teacher_cache,seed=0', 'cached_teacher_cache,seed=1']),
    ('arithmetic_student', 'model.d_model=16,32', ['', '']),     # supervised writes no cache
])
def test_caches_are_shared_only_by_runs_that_can_use_them(tmp_path, config_name, axis, caches):
  plan = sweep.make_plan(small_config(config_name), INVOCATION, str(tmp_path),
                         sweep.parse_axis(axis))
  assert [os.path.basename(r.cache) for r in plan.runs] == caches
  cache_dirs = [r.config.algorithm.kwargs.get('cache_dir', '') for r in plan.runs]
  assert cache_dirs == [r.cache for r in plan.runs]
  assert [w.cache for w in plan.cache_writers] == list(dict.fromkeys(filter(None, cache_dirs)))
  for run in plan.runs:
    if run.cache:
      assert f'--config.algorithm.kwargs.cache_dir={run.cache}' in run.command


def test_markdown_table():
  results = [{'name': 'a=1', 'overrides': {'a': '1'}, 'final': {'ce': 1.234567, 'params': 10,
                                                                'zeta': 3.0}},
             {'name': 'a=2', 'overrides': {'a': '2'}, 'final': {'ce': 0.5, 'params': 20}}]
  assert tables.markdown_table(results).splitlines() == [
      '| run | a | params | ce | zeta |', '|---|---|---|---|---|',
      '| a=1 | 1 | 10 | 1.235 | 3 |', '| a=2 | 2 | 20 | 0.5 |  |']


DECLARED = '''
from configs import arithmetic_student
from distill import report, sweep


def get_config(arg=None):
  return arithmetic_student.get_config(arg)


def get_sweep(arg=None):
  return sweep.product(sweep.axis('model.d_model', [16, 32]),
                       sweep.axis('loss.divergence', ['forward_kl', 'reverse_kl']))
'''


def _sweep_args(tmp_path, teacher):
  config_file = tmp_path / 'declared.py'
  config_file.write_text(DECLARED)
  return [f'--config={config_file}:small,kd', f'--config.teacher.checkpoint={teacher}',
          '--config.mesh.data=1', '--config.eval.generate=False']


def _start_and_kill_when(cmd, path, timeout=600):
  """Starts the command; SIGKILLs it once `path` exists. Returns its stdout."""
  out = tempfile.TemporaryFile('w+')
  proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=out,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.monotonic() + timeout
  while proc.poll() is None and not os.path.exists(path) and time.monotonic() < deadline:
    time.sleep(0.01)
  assert proc.poll() is None, 'the sweep ended before it could be killed'
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  out.seek(0)
  return out.read()


def test_declared_sweep_killed_mid_run_completes_every_run_once(tmp_path):
  teacher = export_random_teacher(str(tmp_path / 'teacher'))
  workdir = tmp_path / 'sweep'
  args = _sweep_args(tmp_path, teacher)
  names = [f'model.d_model={d},loss.divergence={loss}' for d in (16, 32)
           for loss in ('forward_kl', 'reverse_kl')]
  # Killed once run 2 has its step-3 checkpoint (of 6): run 1 finished, run 2 half done.
  _start_and_kill_when([sys.executable, '-m', 'distill.sweep', f'--workdir={workdir}', *args],
                       workdir / names[1] / 'checkpoints' / '3')
  first = workdir / names[0] / 'final_metrics.json'
  finished_at = os.stat(first).st_mtime_ns
  assert not (workdir / names[1] / 'final_metrics.json').exists()

  listed = run_cli(str(workdir), *args, '--list', module='distill.sweep').stdout
  commands = [line for line in listed.splitlines() if not line.startswith('#')]
  assert len(commands) == 4 and f'--workdir={workdir / names[3]}' in commands[3]
  # The last run's command, verbatim through a shell, from another directory.
  subprocess.run(commands[3], shell=True, cwd=tmp_path, env=cli_env(), check=True,
                 capture_output=True)
  assert (workdir / names[3] / 'final_metrics.json').exists()

  out = run_cli(str(workdir), *args, module='distill.sweep').stdout
  assert f'sweep: {names[0]}: finished, skipped' in out       # the killed sweep's run
  assert f'sweep: {names[3]}: finished, skipped' in out       # the listed command's run
  assert 'sweep: run 1/2: ' + names[1] in out and 'sweep: run 2/2: ' + names[2] in out
  assert os.stat(first).st_mtime_ns == finished_at
  results = json.load(open(workdir / 'results.json'))
  assert [r['name'] for r in results] == names
  for r in results:
    run_dir = workdir / r['name']
    assert json.load(open(run_dir / 'final_metrics.json')) == r['final']
    steps = [m['step'] for m in read_metrics(run_dir) if 'loss' in m]
    assert steps == [2, 3, 4, 6], (r['name'], steps)     # every step logged once, resumed or not
    assert json.load(open(run_dir / 'config.json'))['wandb']['group'] == 'sweep'
  # The report's numbers are the runs' (one seed per size and loss: the mean is the value).
  report.write_report([str(workdir)], str(tmp_path / 'report'))
  rows = {(row['method'], int(row['params'])): row
          for row in csv.DictReader(open(tmp_path / 'report' / 'report.csv'))}
  assert len(rows) == 4
  for r in results:
    row = rows[(f'divergence={r["overrides"]["loss.divergence"]}', r['final']['params'])]
    for metric in ('ce', 'perplexity', 'kl_forward', 'kl_reverse'):
      assert float(row[f'{metric}_mean']) == r['final'][metric]


def test_submitit_local_executor_writes_the_shared_cache_first(tmp_path):
  teacher = export_random_teacher(str(tmp_path / 'teacher'))
  workdir = tmp_path / 'sweep'
  out = run_cli(str(workdir), '--config=configs/arithmetic_cached.py:small',
                '--sweep=model.d_model=16,32', f'--config.teacher.checkpoint={teacher}',
                '--config.mesh.data=1', '--config.eval.generate=False', '--config.total_steps=2',
                '--config.algorithm.kwargs.num_rows=32', '--launcher=submitit',
                '--submitit_cluster=local', module='distill.sweep').stdout
  submitted = [line for line in out.splitlines() if line.startswith('sweep: submitted')]
  assert [s.split(':')[1] for s in submitted] == [' submitted 1 job(s) to local',
                                                 ' submitted 2 job(s) to local']
  logs = {}
  for line, log_id in zip(submitted, ('cache', 'runs')):
    for job_id in line.split(': ')[-1].split(', '):
      logs.setdefault(log_id, []).append(open(workdir / 'submitit' / f'{job_id}_0_log.out').read())
  assert 'teacher cache: wrote 32 rows' in logs['cache'][0]
  assert all('teacher cache: reusing 32 rows' in log for log in logs['runs'])
  results = json.load(open(workdir / 'results.json'))
  assert [r['name'] for r in results] == ['model.d_model=16', 'model.d_model=32']
  assert results[0]['final']['params'] < results[1]['final']['params']
