"""Sweeps: axes expanded into typed runs, caches shared only when valid, and a sweep of
three students from the CLI that runs the teacher once and aggregates a table."""
import json
import os

import pytest

from distill.data import teacher_cache
from distill.sweep import run as sweep
from tests.helpers import run_cli, small_config
from tests.test_teacher_cache import export_random_teacher

FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'


def test_axes_expand_to_the_product_with_typed_values():
  config = small_config('arithmetic_cached')
  axes = [sweep.parse_axis('model.d_model=16,32'),
          sweep.parse_axis('loss.kd_weight=1,0.25'),
          sweep.parse_axis('eval.generate=false'),
          sweep.parse_axis('model.preset=tiny')]
  runs = sweep.expand(config, axes)
  assert [name for name, _, _ in runs] == [
      f'model.d_model={d},loss.kd_weight={w},eval.generate=false,model.preset=tiny'
      for d in (16, 32) for w in ('1', '0.25')]
  _, overrides, last = runs[-1]
  assert overrides == {'model.d_model': '32', 'loss.kd_weight': '0.25',
                       'eval.generate': 'false', 'model.preset': 'tiny'}
  assert last.model.d_model == 32 and last.loss.kd_weight == 0.25
  assert last.eval.generate is False and runs[0][2].loss.kd_weight == 1.0
  assert isinstance(runs[0][2].loss.kd_weight, float)
  assert config.model.d_model is None and config.loss.kd_weight == 0.5   # base untouched


@pytest.mark.parametrize('specs, message', [
    (['model.d_model'], "'key=value1,value2,...'"),
    (['model.d_model=16,,32'], "'key=value1,value2,...'"),
    (['model.preset=a/b'], 'names a directory'),
    (['seed=1,1'], 'repeats a value'),
    (['seed=1', 'seed=2'], 'appears in two sweep axes'),
    (['total_step=1,2'], 'total_steps'),                      # the close match is named
    (['total_steps=1.5'], 'sweep value for total_steps'),
    (['eval.generate=maybe'], 'expected true or false'),
])
def test_bad_axes_are_refused_by_name(specs, message):
  with pytest.raises((ValueError, KeyError, AttributeError)) as error:
    sweep.expand(small_config('arithmetic_cached'), [sweep.parse_axis(s) for s in specs])
  assert message in str(error.value), error.value


@pytest.mark.parametrize('config_name, axis, shared', [
    ('arithmetic_cached', 'model.d_model=16,32', True),
    ('arithmetic_seqkd', 'loss.ce_weight=1,2', True),
    ('arithmetic_cached', 'algorithm.kwargs.k=4,8', False),   # the cache depends on k
    ('arithmetic_cached', 'seed=0,1', False),
    ('arithmetic_student', 'model.d_model=16,32', False),     # supervised writes no cache
])
def test_caches_are_shared_only_when_every_run_can_use_them(tmp_path, config_name, axis, shared):
  axes = [sweep.parse_axis(axis)]
  runs = sweep.expand(small_config(config_name), axes)
  sweep.share_caches(runs, str(tmp_path), [k for k, _ in axes])
  dirs = {config.algorithm.kwargs.get('cache_dir', '') for _, _, config in runs}
  name = runs[0][2].algorithm.name
  assert dirs == ({str(tmp_path / f'{name}_cache')} if shared else {''})


def test_markdown_table():
  results = [{'name': 'a=1', 'overrides': {'a': '1'}, 'final': {'ce': 1.234567, 'params': 10,
                                                                'zeta': 3.0}},
             {'name': 'a=2', 'overrides': {'a': '2'}, 'final': {'ce': 0.5, 'params': 20}}]
  assert sweep.markdown_table(results).splitlines() == [
      '| run | a | params | ce | zeta |', '|---|---|---|---|---|',
      '| a=1 | 1 | 10 | 1.235 | 3 |', '| a=2 | 2 | 20 | 0.5 |  |']


def test_sweep_of_three_students_runs_the_teacher_once(tmp_path):
  teacher = export_random_teacher(str(tmp_path / 'teacher'))
  workdir = tmp_path / 'sweep'
  env = {'XLA_FLAGS': f'{os.environ.get("XLA_FLAGS", "")} {FAST_COMPILE}'}
  proc = run_cli(str(workdir), '--config=configs/arithmetic_cached.py:small',
                 '--sweep=model.d_model=16,32,48', f'--config.teacher.checkpoint={teacher}',
                 '--config.mesh.data=1', '--config.eval.generate=False', '--config.total_steps=2',
                 '--config.log_steps=1', '--config.algorithm.kwargs.num_rows=32',
                 module='distill.sweep', env=env)
  out = proc.stdout
  assert out.count('teacher cache: wrote 32 rows') == 1, out
  assert out.count('teacher cache: reusing 32 rows') == 2, out
  manifest = teacher_cache.read_manifest(str(workdir / 'cached_teacher_cache'))
  assert manifest['complete'] and manifest['rows_computed'] == 32   # one teacher pass
  results = json.load(open(workdir / 'results.json'))
  names = [f'model.d_model={d}' for d in (16, 32, 48)]
  assert [r['name'] for r in results] == names
  params = [r['final']['params'] for r in results]
  assert params[0] < params[1] < params[2]
  for r in results:
    assert json.load(open(workdir / r['name'] / 'final_metrics.json')) == r['final']
    assert {'ce', 'kl_forward', 'kl_reverse'} <= set(r['final'])
    steps = [json.loads(line).get('topk_mass') for line in open(workdir / r['name'] /
                                                                 'metrics.jsonl')]
    assert sum(m is not None for m in steps) == 2   # trained from the cache, two steps
    assert not os.path.exists(workdir / r['name'] / 'teacher_cache')
  table = open(workdir / 'results.md').read().splitlines()
  assert table[0].startswith('| run | model.d_model | params |') and len(table) == 5
  assert table[2].startswith('| model.d_model=16 | 16 | ')
  assert out.endswith('\n'.join(table) + '\n')
