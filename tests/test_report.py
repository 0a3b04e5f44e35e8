"""Reports: numbers equal the runs' files (mean ± t-interval over seeds), plots written, and bad
input (no finished runs, runs of different tasks) refused before anything is written."""
import csv
import json
import math
import os
import statistics
import subprocess
import sys

import pytest
from scipy import stats as scipy_stats

from distill import report
from distill.report import stats
from tests.helpers import REPO, small_config

SEEDS = (0, 1, 2)
SIZES = {'tiny': 9232, 'student-100k': 112704}
METHODS = {'supervised': 'forward_kl', 'gkd': 'jsd'}
# The report names a method by the fields its runs differ in (the GKD config sets the weights).
LABELS = {'gkd': 'algorithm=gkd, ce_weight=0.0, divergence=jsd, kd_weight=1.0',
          'supervised': 'algorithm=supervised, ce_weight=0.5, divergence=forward_kl, kd_weight=0.5'}
SEQ_LEN = (12, 20)   # prompt, completion


def final_metrics(method: str, preset: str, seed: int) -> dict:
  """Made-up but distinct metrics, so a mix-up of runs shows in the numbers."""
  base = 0.5 + 0.1 * list(METHODS).index(method) - 0.2 * list(SIZES).index(preset)
  return {'accuracy': base + 0.01 * seed, 'ce': 1.0 - base + 0.02 * seed,
          'perplexity': math.exp(1.0 - base + 0.02 * seed), 'kl_forward': 0.1 * base + 0.001 * seed,
          'kl_reverse': 0.2 * base + 0.003 * seed, 'params': SIZES[preset]}


def write_run(path, *, method='supervised', preset='tiny', seed=0, task='arithmetic',
              total_steps=4, teacher=''):
  """A finished run as distill.main leaves it: config.json, final_metrics.json, metrics.jsonl."""
  config = small_config('arithmetic_gkd' if method == 'gkd' else 'arithmetic_student')
  config.model.preset, config.seed, config.task.name = preset, seed, task
  config.loss.divergence, config.total_steps = METHODS[method], total_steps
  config.teacher.checkpoint = teacher
  config.task.prompt_len, config.task.completion_len = SEQ_LEN
  os.makedirs(path)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=1, sort_keys=True))
  with open(os.path.join(path, 'final_metrics.json'), 'w') as f:
    json.dump(final_metrics(method, preset, seed), f)
  tokens_per_step = config.data.batch_size * sum(SEQ_LEN)
  with open(os.path.join(path, 'metrics.jsonl'), 'w') as f:
    for step in (2, 4):   # two steps per log at 1000 * (seed + 1) tokens/s
      f.write(json.dumps({'step': step, 'loss': 2.0 / step + seed,
                          'tokens_per_s': 1000.0 * (seed + 1)}) + '\n')
  return 2 * 2 * tokens_per_step / (1000.0 * (seed + 1)), total_steps * tokens_per_step


def write_sweep(directory) -> dict:
  """2 methods x 2 sizes x 3 seeds; returns {run name: (train_seconds, tokens)}."""
  derived = {}
  for method in METHODS:
    for preset in SIZES:
      for seed in SEEDS:
        name = f'algorithm.name={method},model.preset={preset},seed={seed}'
        derived[name] = write_run(os.path.join(directory, name), method=method, preset=preset,
                                  seed=seed)
  return derived


@pytest.mark.parametrize('df', [1, 2, 3, 5, 10, 29, 30, 31, 45, 100, 1000])
def test_t_quantiles_match_scipy(df):
  assert stats.t975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=1.5e-3)


def test_report_numbers_equal_the_runs_files(tmp_path):
  derived = write_sweep(tmp_path / 'sweep')
  written = report.write_report([str(tmp_path / 'sweep')], str(tmp_path / 'out'))
  assert sorted(os.path.basename(p) for p in written) == [
      'learning_curves.png', 'metric_vs_params.png', 'pareto.png', 'report.csv', 'report.md']
  for name in ('learning_curves.png', 'metric_vs_params.png', 'pareto.png'):
    assert open(tmp_path / 'out' / name, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
  rows = list(csv.DictReader(open(tmp_path / 'out' / 'report.csv')))
  order = [(m, p) for m in sorted(METHODS) for p in SIZES]   # methods as found, sizes ascending
  assert [(r['method'], r['size']) for r in rows] == [(LABELS[m], p) for m, p in order]
  for row, (method, preset) in zip(rows, order):
    assert row['seeds'] == '0 1 2' and int(row['params']) == SIZES[preset]
    finals = [final_metrics(method, preset, s) for s in SEEDS]
    names = [f'algorithm.name={method},model.preset={preset},seed={s}' for s in SEEDS]
    columns = {m: [f[m] for f in finals] for m in ('accuracy', 'ce', 'perplexity', 'kl_forward',
                                                   'kl_reverse')}
    columns['train_seconds'] = [derived[n][0] for n in names]
    columns['tokens'] = [derived[n][1] for n in names]
    assert len(set(columns['tokens'])) == 1   # the same steps for every seed: no spread
    for metric, values in columns.items():
      assert float(row[f'{metric}_mean']) == pytest.approx(statistics.fmean(values), rel=1e-12)
      half = float(row[f'{metric}_ci95'])
      if metric == 'tokens':
        assert half == 0.0
        continue
      low, high = scipy_stats.t.interval(0.95, len(values) - 1, loc=statistics.fmean(values),
                                         scale=scipy_stats.sem(values))
      assert half == pytest.approx((high - low) / 2, rel=2e-3), metric
  table = open(tmp_path / 'out' / 'report.md').read()
  first = final_metrics('supervised', 'tiny', 0)['accuracy']
  assert f'| {LABELS["supervised"]} | tiny | 9,232 | 3 | {100 * (first + 0.01):.1f} ± ' in table


def test_a_method_is_named_by_the_fields_its_runs_differ_in(tmp_path):
  write_run(str(tmp_path / 'a'), teacher='/runs/teacher-1m', seed=0)
  write_run(str(tmp_path / 'b'), teacher='/runs/teacher-1m', seed=1)
  write_run(str(tmp_path / 'c'), teacher='/runs/teacher-4m/', seed=0)
  write_run(str(tmp_path / 'd'), teacher='/runs/teacher-4m/', seed=0, preset='student-100k')
  runs = {os.path.basename(r.path): r for r in report.load_runs([str(tmp_path)])}
  assert {k: r.method for k, r in runs.items()} == {
      'a': 'checkpoint=teacher-1m', 'b': 'checkpoint=teacher-1m', 'c': 'checkpoint=teacher-4m',
      'd': 'checkpoint=teacher-4m'}   # seeds and sizes are the other axes
  groups = report.aggregate(list(runs.values()))
  assert [(g.method, g.params, g.seeds) for g in groups] == [
      ('checkpoint=teacher-1m', 9232, [0, 1]), ('checkpoint=teacher-4m', 9232, [0]),
      ('checkpoint=teacher-4m', 112704, [0])]


def test_a_study_names_its_methods_and_many_run_directories_by_their_parent(tmp_path):
  write_sweep(tmp_path / 'sweep')
  run_dirs = sorted(str(p) for p in (tmp_path / 'sweep').iterdir())
  report.write_report(run_dirs, str(tmp_path / 'out'),
                      method_label=lambda run: run.config['algorithm.name'].upper())
  rows = list(csv.DictReader(open(tmp_path / 'out' / 'report.csv')))
  assert [(r['method'], r['n']) for r in rows] == [
      ('GKD', '3'), ('GKD', '3'), ('SUPERVISED', '3'), ('SUPERVISED', '3')]
  header = open(tmp_path / 'out' / 'report.md').readline()
  assert header == f'Runs: 12 directories under {tmp_path / "sweep"}\n'


def test_a_torn_run_record_is_left_out_with_a_warning_naming_it(tmp_path):
  write_sweep(tmp_path / 'sweep')
  torn = tmp_path / 'sweep' / 'algorithm.name=gkd,model.preset=tiny,seed=0' / 'final_metrics.json'
  torn.write_text(torn.read_text()[:10])
  curve = tmp_path / 'sweep' / 'algorithm.name=gkd,model.preset=tiny,seed=1' / 'metrics.jsonl'
  curve.write_text(curve.read_text() + '{"step": 6, "lo')
  with pytest.warns(UserWarning) as caught:
    runs = report.load_runs([str(tmp_path / 'sweep')])
  assert len(runs) == 11
  messages = ' '.join(str(w.message) for w in caught)
  assert str(torn) in messages and str(curve) in messages


def test_no_finished_runs_is_refused_before_writing(tmp_path):
  os.makedirs(tmp_path / 'empty' / 'run_without_final')
  (tmp_path / 'empty' / 'run_without_final' / 'config.json').write_text('{}')
  with pytest.raises(ValueError, match='no finished runs under .*empty'):
    report.write_report([str(tmp_path / 'empty')], str(tmp_path / 'out'))
  with pytest.raises(FileNotFoundError, match='is not a directory'):
    report.write_report([str(tmp_path / 'missing')], str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()


def test_runs_of_different_tasks_are_refused_and_the_old_report_kept(tmp_path):
  write_run(str(tmp_path / 'a' / 'run'), task='arithmetic')
  write_run(str(tmp_path / 'b' / 'run'), task='hmm')
  out = tmp_path / 'out'
  os.makedirs(out)
  (out / 'report.md').write_text('the committed report')


  proc = subprocess.run([sys.executable, '-m', 'distill.report', str(tmp_path / 'a'),
                         str(tmp_path / 'b'), f'--out={out}'], cwd=REPO, capture_output=True,
                        text=True)
  assert proc.returncode == 2
  assert 'the runs are not comparable: task.name differs ("arithmetic" in 1 run(s)' in proc.stderr
  assert '"hmm" in 1 run(s)' in proc.stderr
  assert os.listdir(out) == ['report.md']
  assert (out / 'report.md').read_text() == 'the committed report'
