"""Runs of the trainer's step under the layouts of tests/test_sharding.py: tiny models, a
random teacher, the first batches of the arithmetic task, any built-in method (METHODS).

`python -m tests.sharding_runs ALGORITHM [--accumulate]` prints, as one JSON object, each
layout's per-step (loss, grad_norm) and whether the teacher's layout differs from the
student's (with --accumulate also each layout's accumulated run); the test runs it
in a process of its own to compile without XLA's backend optimisations (3x faster here).
experiments/sharding_matrix runs every method under every layout, with accumulation too.
"""
import atexit
import functools
import json
import os
import shutil
import sys
import tempfile

import jax
import numpy as np

from distill import algorithms
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
ACCUM = 2      # micro-batches of the accumulated runs
# Every weight dimension of these models divides by 8, so each layout really shards them.
VOCAB = 48
LAYOUTS = {'data': {'data': 8}, 'fsdp': {'data': 1, 'fsdp': 8},
           'tensor': {'data': 1, 'tensor': 8}, '2x2x2': {'data': 2, 'fsdp': 2, 'tensor': 2}}
# The teacher sharded the other way round from the student's default rules: its embedding
# dimension over 'tensor', its heads / mlp / vocabulary over 'data' x 'fsdp'.
TEACHER_SHARDING = {'embed': 'tensor', 'heads': 'data,fsdp', 'kv_heads': 'data,fsdp',
                    'mlp': 'data,fsdp', 'vocab': 'data,fsdp'}


# Each built-in method's `:small` config and the fields these runs change in it.
METHODS = {
    'supervised': ('arithmetic_student', 'small', {}),
    'seqkd': ('arithmetic_seqkd', 'small', {'algorithm.kwargs.num_prompts': 32}),
    'cached_teacher': ('arithmetic_cached', 'small', {'algorithm.kwargs.num_rows': 32}),
    'topk_online': ('arithmetic_cached', 'small,online', {}),
    'hidden_kd': ('arithmetic_hidden_kd', 'small', {}),
    'taid': ('arithmetic_taid', 'small', {}),
    # The student samples at every step.
    'gkd': ('arithmetic_gkd', 'small', {'algorithm.kwargs.lmbda': 1.0}),
    'distillm': ('arithmetic_distillm', 'small', {}),
    'skd': ('arithmetic_skd', 'small', {}),
    'minillm': ('arithmetic_minillm', 'small', {}),
    'onpolicy_rkl': ('arithmetic_onpolicy_rkl', 'small', {}),
    # The teacher on ids of its own tokenizer (here the same characters) and the shared spans.
    'cross_tokenizer': ('arithmetic_student', 'small',
                        {'algorithm.name': 'cross_tokenizer', 'teacher.tokenizer': 'char',
                         'loss.ce_weight': 0.5}),
}

@functools.cache
def cache_root() -> str:
  """Where teacher caches (seqkd, cached_teacher) go: a method's first run writes its cache and
  its runs under the other layouts read it, so all of them train on the same rows."""
  root = tempfile.mkdtemp(prefix='distill-sharding-caches-')
  atexit.register(shutil.rmtree, root, ignore_errors=True)
  return root


def make_config(algorithm: str, mesh: dict, **data):
  module, arg, fields = METHODS[algorithm]
  config = small_config(module, arg)
  for field, value in fields.items():
    *path, name = field.split('.')
    functools.reduce(lambda section, key: section[key], path, config)[name] = value
  if 'cache_dir' in algorithms.get(algorithm).defaults:
    config.algorithm.kwargs.cache_dir = os.path.join(cache_root(), algorithm)
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


def build(config, teacher_dtype=None):
  """(run, method, state, step_fn): the trainer's run, state and step without its files, with
  a random teacher."""
  mesh, rules = mesh_lib.make_mesh(config.mesh), mesh_lib.student_rules(config)
  teacher_config = TEACHER
  teacher_params = placed(TEACHER, 1, mesh, mesh_lib.teacher_rules(config))
  teacher_graphdef, _ = sharded.abstract_model(teacher_config)
  if teacher_dtype:
    teacher_graphdef, teacher_params, teacher_config = sharded.in_dtype(
        teacher_config, teacher_params, teacher_dtype)
  run = run_lib.Run(config, '', CharTokenizer(), tasks.get_task('arithmetic'), mesh, STUDENT,
                    teacher_graphdef, teacher_params, teacher_config, rules=rules,
                    initial_params=placed(STUDENT, 0, mesh, rules),
                    teacher_tokenizer=run_lib.teacher_tokenizer(config))
  method = trainer.make_method(run)
  optimizer = opt_lib.make_optimizer(config)
  state, shardings, graphdef = state_lib.create_train_state(
      run.model_config, optimizer, jax.random.PRNGKey(0), mesh,
      algo_state_fn=lambda: method.init_state(optimizer), initial_params=run.initial_params,
      rules=rules)
  step_fn = step_lib.make_step(config, run, method, graphdef, shardings, optimizer)
  return run, method, state, step_fn


def losses_of(config, teacher_dtype=None):
  """Per-step (loss, grad_norm) of STEPS steps on the first batches of the task."""
  run, method, state, step_fn = build(config, teacher_dtype)
  mesh = run.mesh
  batches = method.train_batches(run_lib.train_iterator(run))
  out = []
  for _ in range(STEPS):
    batch = run_lib.to_global(next(batches), mesh_lib.batch_sharding(mesh))
    state, metrics = step_fn(state, run.teacher_params, batch)
    out.append([float(metrics[k][0] / metrics[k][1]) for k in ('loss', 'grad_norm')])
  return np.asarray(out), state, run


def main(algorithm: str, accumulate: bool = False):
  """Prints {run: {'losses', 'teacher_differs'}} for 'one' (1 device) and each layout; with
  accumulate also each layout at data.grad_accum_steps=ACCUM ('LAYOUT+accum')."""
  configs = {name: make_config(algorithm, mesh) for name, mesh in {'one': {}, **LAYOUTS}.items()}
  if accumulate:
    configs.update({f'{name}+accum': make_config(algorithm, mesh, grad_accum_steps=ACCUM)
                    for name, mesh in LAYOUTS.items()})
  out = {}
  for name, config in configs.items():
    losses, state, run = losses_of(config)
    student_wq = state['params']['layers']['wq'][...].sharding.spec
    teacher_wq = run.teacher_params['layers']['wq'][...].sharding.spec
    out[name] = {'losses': losses.tolist(), 'teacher_differs': student_wq != teacher_wq}
  print(json.dumps(out))


if __name__ == '__main__':
  main(sys.argv[1], accumulate='--accumulate' in sys.argv[2:])
