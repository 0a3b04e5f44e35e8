"""A run built and checked before anything compiles: config → tokenizer, task, mesh, models.

`build_run(config, workdir)` resolves the task's sequence lengths, makes the mesh, builds
or loads the student's starting point and loads the teacher (a finished run's workdir or a
Hugging Face folder), with every mismatch (vocabularies, lengths, presets) refused by name.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from distill import algorithms, teacher_client
from distill.algorithms.cross_tokenizer import CrossTokenizer
from distill.data import pipeline, tasks, teacher_cache
from distill.data.hf_tokenizer import HFTokenizer
from distill.data.tokenizer import CharTokenizer
from distill.models import ModelConfig, get_preset, sharded
from distill.parallel import host_data
from distill.parallel import mesh as mesh_lib
from distill.train import config as config_lib
from distill.train import teacher as teacher_lib


@dataclasses.dataclass
class Run:
  """What a run is made of, built and validated before anything compiles."""
  config: Any
  workdir: str
  tokenizer: Any               # CharTokenizer or HFTokenizer (same interface)
  task: Any
  mesh: jax.sharding.Mesh
  model_config: ModelConfig
  teacher_graphdef: Any = None
  teacher_params: Any = None
  teacher_config: ModelConfig | None = None
  teacher_server: Any = None    # distill.teacher_client.TeacherClient (config.teacher.server)
  teacher_tokenizer: Any = None  # the teacher's own tokenizer (config.teacher.tokenizer) or None
  initial_params: Any = None    # the student's starting point (model.init_from)
  # Several teachers routed per row (config.teachers.routes): (split, index) -> the index of
  # that example's teacher, added to the rows as distill.data.pipeline.ROUTE_FIELD.
  teacher_route: Any = None
  rules: tuple = mesh_lib.DEFAULT_RULES   # the student's logical-axis rules (config.mesh.rules)

  @property
  def seq_len(self) -> int:
    return self.config.task.prompt_len + self.config.task.completion_len

  def identity(self) -> dict:
    """What must match for a checkpoint to be resumed by this run."""
    return {'model': dataclasses.asdict(self.model_config),
            'task': self.config.task.to_dict(),
            'tokenizer': self.tokenizer.fingerprint(),
            'role': self.config.role,
            'algorithm': self.config.algorithm.name}


def build_run(config, workdir: str) -> Run:
  config_lib.validate(config)
  tokenizer = HFTokenizer(config.tokenizer) if config.tokenizer else CharTokenizer()
  task = tasks.get_task(config.task.name, **config.task.kwargs)
  config = config.copy_and_resolve_references()
  if not (config.task.prompt_len and config.task.completion_len):
    needed = tasks.sequence_lengths(task)
    for name, length in zip(('prompt_len', 'completion_len'), needed):
      config.task[name] = config.task[name] or length
  mesh = mesh_lib.make_mesh(config.mesh)
  rules, teacher_rules = mesh_lib.student_rules(config), mesh_lib.teacher_rules(config)
  initial_params = None
  if config.model.init_from:
    _, initial_params, model_config = teacher_lib.load_exported(config.model.init_from, mesh)
  else:
    overrides = config_lib.model_overrides(config)
    try:
      model_config = get_preset(config.model.preset,
                                **{'vocab_size': tokenizer.vocab_size, **overrides})
    except ValueError as e:   # the message names a ModelConfig field; say which were set
      set_here = ', '.join(f'config.model.{k}={v!r}' for k, v in overrides.items())
      raise ValueError(f'{e} (preset {config.model.preset!r}' +
                       (f' with {set_here})' if set_here else ')')) from None
  if model_config.vocab_size < tokenizer.vocab_size:
    raise ValueError(f'the model vocabulary (config.model.vocab_size={model_config.vocab_size}) '
                     f'is smaller than the tokenizer\'s ({tokenizer.vocab_size})')
  config_lib.validate(config, model_max_seq_len=model_config.max_seq_len,
                      data_parallel=mesh_lib.data_parallel_size(mesh))
  run = Run(config, workdir, tokenizer, task, mesh, model_config, initial_params=initial_params,
            rules=rules)
  if config.role == 'student':
    run.teacher_tokenizer = teacher_tokenizer(config)
    teacher_lib.check_teachers_config(config)
  if config.role == 'student' and config.teacher.checkpoint:
    loaded = [_load_teacher(run, path, teacher_rules)
              for path in (config.teacher.checkpoint, *config.teachers.more)]
    graphdef, params, teacher_config = loaded[0]
    if config.teacher.preset and get_preset(
        config.teacher.preset,
        vocab_size=(run.teacher_tokenizer or tokenizer).vocab_size) != teacher_config:
      raise ValueError(f'teacher.preset={config.teacher.preset!r} does not match the model saved in '
                       f'{config.teacher.checkpoint}: {teacher_config}')
    run.teacher_graphdef, run.teacher_params, run.teacher_config = graphdef, params, teacher_config
    if len(loaded) > 1:   # several teachers: the step's teacher is their ensemble
      run.teacher_graphdef, run.teacher_params, run.teacher_route = teacher_lib.ensemble(
          config, tokenizer, task, loaded)
  if config.role == 'student' and config.teacher.server:
    local = (None if run.teacher_params is None else
             teacher_cache.fingerprint_model(run.teacher_config, run.teacher_params))
    run.teacher_server = teacher_client.open_for_run(config, tokenizer, local)
    if config.teachers.more:   # several served teachers, answering as one
      run.teacher_server, run.teacher_route = teacher_lib.served_teachers(
          config, tokenizer, task, run.teacher_server, model_config.vocab_size)
  return run


def _load_teacher(run: Run, checkpoint: str, rules):
  """(graphdef, params, model_config) of one teacher, checked against the run."""
  graphdef, params, teacher_config = teacher_lib.load_exported(checkpoint, run.mesh, rules)
  dtype = run.config.teacher.dtype
  if dtype and (teacher_config.dtype, teacher_config.param_dtype) != (dtype, dtype):
    graphdef, params, teacher_config = sharded.in_dtype(teacher_config, params, dtype)
  if teacher_config.max_seq_len < run.seq_len:
    raise ValueError(f'sequence length {run.seq_len} exceeds the max_seq_len '
                     f'{teacher_config.max_seq_len} of teacher {checkpoint}')
  # Only cross-tokenizer methods (run.teacher_tokenizer set) compare unequal vocabularies.
  if run.teacher_tokenizer is None and teacher_config.vocab_size != run.model_config.vocab_size:
    raise ValueError(f'teacher {checkpoint} vocabulary ({teacher_config.vocab_size}) != student '
                     f'vocabulary ({run.model_config.vocab_size}); distillation over logits '
                     'needs equal vocabularies (or a cross-tokenizer method: '
                     'algorithm.name=\'cross_tokenizer\' with config.teacher.tokenizer)')
  teacher_vocab = (run.teacher_tokenizer or run.tokenizer).vocab_size
  if teacher_config.vocab_size < teacher_vocab:
    raise ValueError(f'teacher {checkpoint} vocabulary ({teacher_config.vocab_size}) is smaller '
                     f'than its tokenizer\'s ({teacher_vocab}): is config.teacher.tokenizer the '
                     'one it was trained with?')
  return graphdef, params, teacher_config


def teacher_tokenizer(config):
  """The teacher's own tokenizer (config.teacher.tokenizer), or None when it shares the
  student's. Cross-tokenizer methods need one; every other method is refused one."""
  spec = algorithms.get(config.algorithm.name)
  cross, name = issubclass(spec.objective, CrossTokenizer), config.teacher.tokenizer
  if cross and not name:
    raise ValueError(f'algorithm {spec.name!r} distils from a teacher with its own tokenizer: '
                     'set config.teacher.tokenizer to it (a Hugging Face folder holding '
                     'tokenizer.json, or \'char\' for the character tokenizer)')
  if name and not cross:
    raise ValueError(f'config.teacher.tokenizer={name!r} is set, but algorithm {spec.name!r} '
                     'compares teacher and student over one vocabulary; a teacher with its own '
                     'tokenizer needs a cross-tokenizer method '
                     '(algorithm.name=\'cross_tokenizer\')')
  if not name:
    return None
  return CharTokenizer() if name == 'char' else HFTokenizer(name)


def train_iterator(run: Run):
  """This process's rows of each global batch (distill.parallel.host_data)."""
  c = run.config
  rows = pipeline.make_dataset(run.task, run.tokenizer, split='train', seed=c.seed,
                               prompt_len=c.task.prompt_len,
                               completion_len=c.task.completion_len, shuffle=True,
                               teacher_tokenizer=run.teacher_tokenizer,
                               route=run.teacher_route)
  local = host_data.host_rows(rows, c.data.batch_size)
  return iter(local.batch(c.data.batch_size // jax.process_count(), drop_remainder=True)
              .to_iter_dataset())


def to_global(batch: dict, sharding) -> dict:
  """Host-local numpy rows → one global array per field, split along the batch axis."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
