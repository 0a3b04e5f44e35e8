"""The foundation end to end: training, resume after SIGKILL, sharding, CLI, bad input."""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from distill.train import teacher as teacher_lib
from distill.train import run as run_lib
from distill.train import trainer
from tests.helpers import read_metrics, run_cli, run_cli_killed, small_config

TEACHER = '--config=configs/arithmetic_teacher.py:small'
STUDENT = '--config=configs/arithmetic_student.py:small'


def _params(workdir):
  """Final params of a run as numpy (restored without any sharding)."""
  from distill.parallel import mesh as mesh_lib
  mesh = mesh_lib.make_mesh({'data': 1})
  _, params, _ = teacher_lib.load_exported(workdir, mesh)
  return jax.tree.leaves(jax.device_get(params))


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('teacher'))
  config = small_config('arithmetic_teacher')
  trainer.train(config, workdir)
  return workdir


def test_loss_decreases(tmp_path):
  config = small_config('arithmetic_teacher')
  config.total_steps = 40
  config.log_steps = 10
  config.checkpoint_steps = 40
  config.optimizer.learning_rate = 3e-3
  trainer.train(config, str(tmp_path))
  losses = [r['loss'] for r in read_metrics(tmp_path) if 'loss' in r]
  assert losses[-1] < 0.7 * losses[0], losses


def test_kill_and_resume_is_bit_identical(tmp_path):
  """A run SIGKILLed after its first checkpoint and restarted ends exactly like an
  uninterrupted one."""
  args = [STUDENT + ',scratch', '--config.total_steps=8', '--config.checkpoint_steps=2']
  straight, crashed = str(tmp_path / 'straight'), str(tmp_path / 'crashed')
  run_cli(straight, *args)
  killed = run_cli_killed(crashed, *args, checkpoint_step=2)
  assert killed.returncode == -9, killed.stderr           # it really died mid-run
  assert not os.path.exists(os.path.join(crashed, 'params'))
  run_cli(crashed, *args)
  for a, b in zip(_params(straight), _params(crashed), strict=True):
    np.testing.assert_array_equal(a, b)
  strip = lambda rows: [{k: v for k, v in r.items() if k != 'tokens_per_s'} for r in rows]
  assert strip(read_metrics(straight)) == strip(read_metrics(crashed))
  # Both runs could take one step too many alike: the checkpoint of step 8 has done 8 steps.
  last = ocp.StandardCheckpointer().restore(os.path.join(crashed, 'checkpoints', '8', 'state'))
  assert int(last['step']) == 8


def test_eight_devices_match_one(tmp_path, teacher_dir):
  """Data parallel over 8 devices gives the losses of a single device."""
  assert jax.device_count() == 8
  results = {}
  for n in (1, 8):
    config = small_config('arithmetic_student')
    config.teacher.checkpoint = teacher_dir
    config.mesh.data = n
    workdir = str(tmp_path / f'dev{n}')
    trainer.train(config, workdir)
    results[n] = [r['loss'] for r in read_metrics(workdir) if 'loss' in r]
  np.testing.assert_allclose(results[1], results[8], rtol=2e-5)


def test_cli_overrides_and_files(tmp_path, teacher_dir):
  workdir = str(tmp_path)
  run_cli(workdir, STUDENT, f'--config.teacher.checkpoint={teacher_dir}',
          '--config.total_steps=4', '--config.loss.divergence=reverse_kl',
          '--config.model.d_ff=48')
  saved = json.load(open(os.path.join(workdir, 'config.json')))
  assert saved['total_steps'] == 4 and saved['loss']['divergence'] == 'reverse_kl'
  assert json.load(open(os.path.join(workdir, 'model.json')))['d_ff'] == 48
  assert read_metrics(workdir)[-1]['step'] == 4
  final = json.load(open(os.path.join(workdir, 'final_metrics.json')))
  assert {'ce', 'perplexity', 'kl_forward', 'kl_reverse', 'accuracy'} <= set(final)


@pytest.mark.parametrize('override, message', [
    ('--config.total_step=5', 'total_steps'),                 # close match named
    ('--config.total_steps=0', 'total_steps must be positive'),
    ('--config.optimizer.learning_rate=-1', 'learning_rate must be positive'),
    ('--config.task.completion_len=400', "exceeds the model's max_seq_len"),
    ('--config.data.batch_size=12', 'not divisible by the data-parallel size'),
    ('--config.model.preset=studnet-2m', 'student-2m'),
    ('--config.algorithm.name=gkdd', 'unknown algorithm'),
])
def test_bad_config_is_a_clear_error(tmp_path, override, message):
  proc = run_cli(str(tmp_path), STUDENT + ',scratch', override, check=False)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr
  assert 'Traceback' not in proc.stderr


def test_missing_teacher_checkpoint(tmp_path):
  proc = run_cli(str(tmp_path / 'run'), STUDENT, f'--config.teacher.checkpoint={tmp_path}/nope',
                 check=False)
  assert proc.returncode == 2 and 'Train the teacher first' in proc.stderr, proc.stderr


def test_kd_without_teacher_is_refused(tmp_path):
  proc = run_cli(str(tmp_path), STUDENT, check=False)
  assert proc.returncode == 2 and 'needs a teacher' in proc.stderr, proc.stderr


def test_teacher_vocab_mismatch(tmp_path, teacher_dir):
  config = small_config('arithmetic_student')
  config.teacher.checkpoint = teacher_dir
  config.model.vocab_size = 128
  with pytest.raises(ValueError, match='vocabular'):
    trainer.train(config, str(tmp_path))


def test_incompatible_workdir_is_refused_and_untouched(tmp_path, teacher_dir):
  workdir = str(tmp_path)
  config = small_config('arithmetic_student', 'small,scratch')
  trainer.train(config, workdir)
  before = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  config = small_config('arithmetic_student', 'small,scratch')
  config.model.d_model = 64
  with pytest.raises(ValueError, match='incompatible run'):
    trainer.train(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == before


def test_student_starts_from_a_finished_run(tmp_path, teacher_dir):
  """model.init_from: the run starts from another run's final params and architecture."""
  config = small_config('arithmetic_student', 'small,scratch')
  config.model.init_from = teacher_dir
  config.model.preset = 'student-100k'     # the checkpoint's architecture wins
  run = run_lib.build_run(config, str(tmp_path))
  _, _, teacher_config = teacher_lib.load_exported(teacher_dir, run.mesh)
  assert run.model_config == teacher_config
  for a, b in zip(jax.tree.leaves(jax.device_get(run.initial_params)), _params(teacher_dir),
                  strict=True):
    np.testing.assert_array_equal(a, b)
  config.total_steps = config.checkpoint_steps = 2
  trainer.train(config, str(tmp_path))
  assert len(_params(str(tmp_path))) == len(_params(teacher_dir))
