"""Runs of the trainer's step under the layouts of tests/test_sharding.py: tiny models, a
random teacher, the first batches of the arithmetic task.

`python -m tests.sharding_runs ALGORITHM` prints, as one JSON object, each layout's per-step
(loss, grad_norm) and whether the teacher's layout differs from the student's; the test runs it
in a process of its own to compile without XLA's backend optimisations (3x faster here).
"""
import functools
import json
import sys

import jax
import numpy as np

from distill.data import tasks
from distill.data.tokenizer import CharTokenizer
from distill.models import get_preset, sharded
from distill.parallel import mesh as mesh_lib
from distill.train import optimizer as opt_lib
from distill.train import run as run_lib
from distill.train import state as state_lib
from distill.train import step as step_lib
from distill.train import trainer
from tests.helpers import small_config

STEPS = 2
# Every weight dimension of these models divides by 8, so each layout really shards them.
VOCAB = 48
LAYOUTS = {'data': {'data': 8}, 'fsdp': {'data': 1, 'fsdp': 8},
           'tensor': {'data': 1, 'tensor': 8}, '2x2x2': {'data': 2, 'fsdp': 2, 'tensor': 2}}
# The teacher sharded the other way round from the student's default rules: its embedding
# dimension over 'tensor', its heads / mlp / vocabulary over 'data' x 'fsdp'.
TEACHER_SHARDING = {'embed': 'tensor', 'heads': 'data,fsdp', 'kv_heads': 'data,fsdp',
                    'mlp': 'data,fsdp', 'vocab': 'data,fsdp'}


def make_config(algorithm: str, mesh: dict, **data):
  if algorithm == 'gkd':   # on-policy at every step: the student samples inside the step
    config = small_config('arithmetic_gkd')
    config.algorithm.kwargs.lmbda = 1.0
  else:
    config = small_config('arithmetic_student')
  config.mesh.update({'data': 1, 'fsdp': 1, 'tensor': 1, **mesh})
  config.teacher.sharding.update(TEACHER_SHARDING)
  config.task.prompt_len, config.task.completion_len = 9, 33
  config.data.update(data)
  config.loss.chunk_size = 0
  return config


STUDENT = get_preset('tiny', VOCAB, n_layers=1)
TEACHER = get_preset('tiny', VOCAB, d_model=64, d_ff=128, n_layers=1)


@functools.cache
def host_params(model_config, seed: int):
  """A model's random params as numpy, made once (compiling a sharded init per layout would
  be most of this file's time); each layout places them in its own shardings."""
  return jax.device_get(sharded.random_params(model_config, jax.random.PRNGKey(seed)))


def placed(model_config, seed, mesh, rules):
  shardings = sharded.param_shardings(sharded.abstract_model(model_config)[1], mesh, rules)
  return jax.device_put(host_params(model_config, seed), shardings)


def losses_of(config, teacher_dtype=None):
  """Per-step (loss, grad_norm) of STEPS steps on the first batches of the task, with a random
  teacher: the trainer's run, state and step without its files."""
  mesh, rules = mesh_lib.make_mesh(config.mesh), mesh_lib.student_rules(config)
  teacher_config = TEACHER
  teacher_params = placed(TEACHER, 1, mesh, mesh_lib.teacher_rules(config))
  teacher_graphdef, _ = sharded.abstract_model(teacher_config)
  if teacher_dtype:
    teacher_graphdef, teacher_params, teacher_config = sharded.in_dtype(
        teacher_config, teacher_params, teacher_dtype)
  run = run_lib.Run(config, '', CharTokenizer(), tasks.get_task('arithmetic'), mesh, STUDENT,
                    teacher_graphdef, teacher_params, teacher_config, rules=rules,
                    initial_params=placed(STUDENT, 0, mesh, rules))
  method = trainer.make_method(run)
  optimizer = opt_lib.make_optimizer(config)
  state, shardings, graphdef = state_lib.create_train_state(
      run.model_config, optimizer, jax.random.PRNGKey(0), mesh,
      algo_state_fn=lambda: method.init_state(optimizer), initial_params=run.initial_params,
      rules=rules)
  step_fn = step_lib.make_step(config, run, method, graphdef, shardings, optimizer)
  batches = run_lib.train_iterator(run)
  out = []
  for _ in range(STEPS):
    batch = run_lib.to_global(next(batches), mesh_lib.batch_sharding(mesh))
    state, metrics = step_fn(state, teacher_params, batch)
    out.append([float(metrics[k][0] / metrics[k][1]) for k in ('loss', 'grad_norm')])
  return np.asarray(out), state, run



def main(algorithm: str):
  out = {}
  for name, layout in {'one': {}, **LAYOUTS}.items():
    losses, state, run = losses_of(make_config(algorithm, layout))
    student_wq = state['params']['layers']['wq'][...].sharding.spec
    teacher_wq = run.teacher_params['layers']['wq'][...].sharding.spec
    out[name] = {'losses': losses.tolist(), 'teacher_differs': student_wq != teacher_wq}
  print(json.dumps(out))


if __name__ == '__main__':
  main(sys.argv[1])
