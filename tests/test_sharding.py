"""Layouts: the same run on 1 device and on 8 under data, fsdp, tensor and 2x2x2 meshes, the
teacher sharded by rules of its own, gives the same losses; accumulation == the large batch;
a bf16 teacher; the memory check; the layout's bad input."""
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from distill.parallel import memory
from distill.parallel import mesh as mesh_lib
from distill.train import run as run_lib
from distill.train import teacher as teacher_lib
from distill.train import trainer
from tests.helpers import REPO, read_metrics, run_cli, small_config
from tests.sharding_runs import LAYOUTS, TEACHER, host_params, losses_of, make_config, placed


@pytest.mark.parametrize('algorithm', ['supervised', 'gkd'])
def test_every_layout_gives_the_losses_of_one_device(algorithm):
  """One off-policy and one on-policy method: 1 device, then 8 under each layout."""
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8 '
                      '--xla_backend_optimization_level=0', 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, '-m', 'tests.sharding_runs', algorithm], cwd=REPO,
                        env={**os.environ, **env}, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  runs = json.loads(proc.stdout.splitlines()[-1])
  assert list(runs) == ['one', *LAYOUTS]
  for name in LAYOUTS:
    # The teacher really is laid out unlike the student (so its rules are in force).
    assert runs[name]['teacher_differs'], name
    np.testing.assert_allclose(runs[name]['losses'], runs['one']['losses'], rtol=2e-5,
                               err_msg=name)


@pytest.mark.parametrize('algorithm', ['supervised', 'hidden_kd'])
def test_accumulated_micro_batches_equal_the_whole_batch(algorithm):
  """data.grad_accum_steps=4 on a 2-device mesh: the losses and gradient norms of the batch
  taken whole, in fp32 (hidden_kd: two terms with their own normalisers)."""
  whole, _, _ = losses_of(make_config(algorithm, {'data': 2}))
  accumulated, _, _ = losses_of(make_config(algorithm, {'data': 2}, grad_accum_steps=4))
  np.testing.assert_allclose(accumulated, whole, rtol=1e-6)


def test_bf16_teacher():
  """teacher.dtype=bfloat16: bf16 params in the teacher's own shardings; losses near fp32's."""
  config = make_config('supervised', {'data': 2})
  fp32, _, _ = losses_of(config)
  bf16, _, run = losses_of(config, teacher_dtype='bfloat16')
  leaves = jax.tree.leaves(run.teacher_params)
  assert {x.dtype for x in leaves} == {jax.numpy.dtype('bfloat16')}
  assert run.teacher_config.dtype == 'bfloat16'
  fp32_wq = placed(TEACHER, 1, run.mesh, mesh_lib.teacher_rules(config))['layers']['wq']
  assert run.teacher_params['layers']['wq'][...].sharding == fp32_wq[...].sharding
  np.testing.assert_allclose(bf16, fp32, rtol=2e-2)
  assert not np.array_equal(bf16, fp32)


@pytest.mark.parametrize('rules, message', [
    ({'embed': 'fsdp,model'}, "config.mesh.rules.embed='fsdp,model': mesh axes must be"),
    ({'embed': 'fsdp,fsdp'}, 'must be distinct'),
    ({'embedding': 'fsdp'}, 'config.mesh.rules.embedding: unknown logical axis; valid: batch'),
])
def test_bad_rules_are_named(rules, message):
  with pytest.raises(ValueError, match=message):
    mesh_lib.rules_with(rules)


def test_rules_map_logical_axes():
  rules = mesh_lib.rules_with({'embed': '', 'mlp': 'fsdp,tensor'})
  assert mesh_lib.logical_to_mesh_spec(('layers', 'embed', 'mlp'), rules) == \
      jax.sharding.PartitionSpec(None, None, ('fsdp', 'tensor'))
  config = make_config('supervised', {})
  config.mesh.rules.embed = 'data'
  assert dict(mesh_lib.teacher_rules(config))['embed'] == ('tensor',)   # the teacher's own
  assert dict(mesh_lib.student_rules(config))['embed'] == ('data',)
  config.teacher.sharding.embed = None
  assert dict(mesh_lib.teacher_rules(config))['embed'] == ('data',)     # as the student's


@pytest.mark.parametrize('field, value, message', [
    ('mesh.data', 16, 'need 16 devices, but 8 are available'),
    ('mesh.fsdp', -1, 'at most one axis may be -1'),
    ('data.grad_accum_steps', 3, 'data.grad_accum_steps=3'),
    ('data.batch_size', 12, 'not divisible by the data-parallel size 8'),
    ('mesh.rules.embed', 'fsdp,model', 'mesh axes must be distinct names'),
    ('teacher.sharding.vocab', 'tensr', "config.teacher.sharding.vocab='tensr'"),
    ('teacher.dtype', 'float16', 'config.teacher.dtype must be one of'),
])
def test_bad_layout_is_refused_before_anything_compiles(field, value, message):
  config = small_config('arithmetic_student', 'small,scratch')
  *path, name = field.split('.')
  functools.reduce(lambda section, key: section[key], path, config)[name] = value
  with pytest.raises(ValueError, match=message):
    run_lib.build_run(config, '')


def test_unknown_logical_axis_on_the_command_line(tmp_path):
  proc = run_cli(str(tmp_path), '--config=configs/arithmetic_student.py:small,scratch',
                 '--config.teacher.sharding.embeding=fsdp', check=False)
  assert proc.returncode == 2 and 'Did you mean "embed"' in proc.stderr, proc.stderr
  assert 'Traceback' not in proc.stderr


def test_memory_per_device_is_printed_and_checked_before_the_first_step(tmp_path, capsys):
  config = small_config('arithmetic_student', 'small,scratch')
  config.mesh.data = 2
  config.mesh.device_memory_gb = 1e-5    # 10 kB: less than the params alone
  with pytest.raises(memory.DoesNotFit, match='the step does not fit: memory per device'):
    trainer.train(config, str(tmp_path))
  printed = capsys.readouterr().out
  assert 'memory per device:' in printed and 'optimizer' in printed, printed
  logged = tmp_path / 'metrics.jsonl'     # no step ran
  assert not logged.exists() or not any('loss' in r for r in read_metrics(tmp_path))


def test_build_run_loads_the_teacher_in_its_own_layout_and_dtype(tmp_path):
  """A teacher on disk comes back sharded by config.teacher.sharding, in teacher.dtype."""
  config = make_config('supervised', {'data': 2, 'tensor': 2})
  mesh = mesh_lib.make_mesh(config.mesh)
  teacher_lib.export_final(str(tmp_path), TEACHER, placed(TEACHER, 1, mesh, mesh_lib.DEFAULT_RULES))
  config.teacher.checkpoint, config.teacher.dtype = str(tmp_path), 'bfloat16'
  config.model.vocab_size = TEACHER.vocab_size
  run = run_lib.build_run(config, str(tmp_path / 'run'))
  wq = run.teacher_params['layers']['wq'][...]
  # ('layers', 'embed', 'heads') under TEACHER_SHARDING: embed over tensor, heads over data.
  want = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec(None, 'tensor', 'data'))
  assert wq.sharding.is_equivalent_to(want, wq.ndim), wq.sharding
  assert wq.dtype == jax.numpy.bfloat16 and run.teacher_config.param_dtype == 'bfloat16'
  np.testing.assert_array_equal(
      np.asarray(wq, np.float32),
      np.asarray(host_params(TEACHER, 1)['layers']['wq'][...]).astype(jax.numpy.bfloat16)
      .astype(np.float32))
