"""A researcher's own divergence and method, from files outside the package, through the CLI;
the registries' and --import's bad input."""
import math
import os

import jax
import numpy as np
import pytest

from distill import algorithms, losses, plugins
from distill.algorithms import hooks
from tests.helpers import REPO, read_metrics, run_cli

PLUGINS = os.path.join(REPO, 'tests', 'fixtures', 'plugins')
SMALL = ['--config.mesh.data=1', '--config.eval.generate=False', '--config.total_steps=2',
         '--config.checkpoint_steps=2', '--config.log_steps=1', '--config.wandb.mode=disabled']


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('teacher'))
  run_cli(workdir, '--config=configs/arithmetic_teacher.py:small', *SMALL)
  return workdir


def _train_rows(workdir):
  return [r for r in read_metrics(workdir) if 'loss' in r]


def test_divergence_from_a_file_runs_from_the_cli(teacher_dir, tmp_path):
  run_cli(str(tmp_path), f'--import={PLUGINS}/hellinger.py',
          '--config=configs/arithmetic_student.py:small', *SMALL,
          f'--config.teacher.checkpoint={teacher_dir}', '--config.loss.divergence=hellinger',
          '--config.loss.ce_weight=0')
  rows = _train_rows(str(tmp_path))
  assert [r['step'] for r in rows] == [1, 2]
  # H² lies in [0, 2]; a random tiny student is far from the teacher but not identical.
  assert all(0 < r['loss'] < 2 for r in rows), rows


def test_registered_divergence_matches_its_formula():
  module = plugins.import_plugin(os.path.join(PLUGINS, 'hellinger.py'))
  student, teacher = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5, 7))
  mask = np.array([[1, 1, 0, 1, 1]] * 3, np.float32)
  got = np.asarray(losses.get('hellinger', temperature=2.0)(student, teacher, mask))
  p, q = (np.asarray(jax.nn.softmax(x / 2.0, axis=-1)) for x in (teacher, student))
  want = ((np.sqrt(p) - np.sqrt(q)) ** 2).sum(-1) * mask
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert module.hellinger is not None and 'hellinger' in losses.names()


def test_method_from_a_file_runs_from_the_cli(teacher_dir, tmp_path):
  run_cli(str(tmp_path), f'--import={PLUGINS}/per_row_mix.py',
          '--config=configs/arithmetic_student.py:small', *SMALL,
          f'--config.teacher.checkpoint={teacher_dir}', '--config.algorithm.name=per_row_mix',
          '--config.data.batch_size=16')   # row_lmbda keeps its default, 0.5
  rows = _train_rows(str(tmp_path))
  assert [r['step'] for r in rows] == [1, 2]
  for r in rows:
    assert 0 <= r['sampled_rows'] <= 1 and math.isfinite(r['loss'])
  # 32 rows at λ = 0.5: some of each kind (probability of failing ~1e-9).
  assert 0 < sum(r['sampled_rows'] for r in rows) < 2


@pytest.mark.parametrize('args,message', [
    (['--import=tests/fixtures/plugins/nothing_here.py'], 'no such file'),
    (['--import=no_such_module_anywhere'], "no module named 'no_such_module_anywhere'"),
    (['--import=tests/fixtures/plugins/broken.py'], 'broken.py, line 4: ValueError'),
])
def test_bad_imports_are_named(args, message, tmp_path):
  proc = run_cli(str(tmp_path), *args, '--config=configs/arithmetic_student.py:small,scratch',
                 *SMALL, check=False)
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr
  assert not os.path.exists(os.path.join(tmp_path, 'checkpoints'))


def test_names_that_clash_are_refused():
  with pytest.raises(ValueError, match="'forward_kl' is already a built-in divergence"):
    losses.register('forward_kl', lambda lq, lp: lq.sum(-1))
  with pytest.raises(ValueError, match="'gkd' is already a built-in method"):
    algorithms.register('gkd', rows=hooks.Rows)
  with pytest.raises(ValueError, match='not a subclass of distill.algorithms.Objective'):
    algorithms.register('mine', objective=hooks.Rows)


def test_objective_refuses_a_divergence_it_does_not_minimise(teacher_dir, tmp_path):
  proc = run_cli(str(tmp_path), '--config=configs/arithmetic_taid.py:small', *SMALL,
                 f'--config.teacher.checkpoint={teacher_dir}', '--config.loss.divergence=jsd',
                 check=False)
  assert proc.returncode == 2, proc.stderr
  assert ("algorithm 'taid' minimises forward_kl, not config.loss.divergence='jsd': set it to "
          "one of ['forward_kl']") in proc.stderr
  assert not os.path.exists(os.path.join(tmp_path, 'checkpoints'))
