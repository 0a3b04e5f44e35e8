"""Runs hand their final params to later runs (a teacher to its students) through
`workdir/model.json` + `workdir/params/`; this module writes and reads that pair, and
checks and assembles several teachers (config.teachers) into one ensemble, or several served
teachers into one pool (distill.teacher_pool)."""
from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
from jax.sharding import Mesh

from distill import atomic_file, teacher_client, teacher_pool
from distill.algorithms import teachers as teachers_lib
from distill.algorithms.hooks import is_real
from distill.data.hf_tokenizer import HFTokenizer
from distill.data.tokenizer import CharTokenizer
from distill.models import ModelConfig, hf, sharded
from distill.parallel import mesh as mesh_lib
from distill.train import checkpoint

MODEL_FILE = 'model.json'
PARAMS_DIR = 'params'


def export_final(workdir: str, model_config: ModelConfig, params):
  """Every process joins the params save; process 0 alone writes model.json (a record has one
  writer: two processes renaming the same temp file race, and one finds it gone)."""
  checkpoint.save_params(os.path.join(workdir, PARAMS_DIR), params)
  if jax.process_index() == 0:
    atomic_file.write_json(os.path.join(workdir, MODEL_FILE), dataclasses.asdict(model_config),
                           indent=1)


def has_export(workdir: str) -> bool:
  return (os.path.exists(os.path.join(workdir, MODEL_FILE)) and
          os.path.isdir(os.path.join(workdir, PARAMS_DIR)))


def load_exported(workdir: str, mesh: Mesh, rules=mesh_lib.DEFAULT_RULES):
  """(graphdef, params, model_config) of a finished run or of a Hugging Face checkpoint
  folder, sharded onto `mesh` by the logical-axis `rules`."""
  if not has_export(workdir) and os.path.exists(os.path.join(workdir, 'config.json')):
    return hf.load_hf_params(workdir, mesh, axis_rules=rules)
  if not has_export(workdir):
    raise FileNotFoundError(
        f'no finished run in {workdir!r}: expected {MODEL_FILE} and {PARAMS_DIR}/ there. '
        'Train the teacher first (role=teacher) and point teacher.checkpoint at its workdir, '
        'or at a Hugging Face checkpoint folder.')
  with open(os.path.join(workdir, MODEL_FILE)) as f:
    model_config = ModelConfig(**json.load(f))
  graphdef, abstract = sharded.abstract_model(model_config)
  shardings = sharded.param_shardings(abstract, mesh, rules)
  params = checkpoint.load_params(os.path.join(workdir, PARAMS_DIR), abstract, shardings)
  return graphdef, params, model_config


def check_teachers_config(config) -> None:
  """config.teachers checked on its own (before any teacher is loaded)."""
  t = config.teachers
  n = 1 + len(t.more)
  if not t.more:
    if t.weights or t.routes:
      raise ValueError('config.teachers.weights / routes need config.teachers.more (the '
                       'teachers after config.teacher.checkpoint)')
    return
  served = [is_url(entry) for entry in t.more]
  if config.teacher.server:
    if config.teacher.checkpoint or not all(served):
      raise ValueError('several teachers are either all served (config.teacher.server and URLs '
                       'in config.teachers.more) or all in-process (config.teacher.checkpoint '
                       f'and run folders); got teacher.checkpoint={config.teacher.checkpoint!r}, '
                       f'teachers.more={tuple(t.more)}: a mix of the two is not built')
    if t.routes and config.algorithm.name != 'topk_online':
      raise ValueError('routed served teachers (config.teachers.routes) need each row\'s route '
                       'field, which only topk_online\'s dataset batches carry, not those of '
                       f'{config.algorithm.name!r}; mix them by config.teachers.weights')
  elif not config.teacher.checkpoint:
    raise ValueError('config.teachers.more adds teachers after config.teacher.checkpoint, '
                     'which is not set')
  elif any(served):
    raise ValueError(f'config.teachers.more names servers {[m for m in t.more if is_url(m)]}: '
                     'served teachers need config.teacher.server for the first one (and every '
                     'teacher served)')
  if config.teacher.tokenizer:
    raise ValueError('several teachers (config.teachers.more) share the student\'s tokenizer; '
                     'a teacher with its own (config.teacher.tokenizer) cannot be one of them')
  if bool(t.weights) == bool(t.routes):
    raise ValueError(f'{n} teachers: give either config.teachers.weights (mixed per token) or '
                     'config.teachers.routes (routed per row), one per teacher, '
                     'config.teacher first')
  given, what = (t.weights, 'weights') if t.weights else (t.routes, 'routes')
  if len(given) != n:
    raise ValueError(f'config.teachers.{what} has {len(given)} values for {n} teachers '
                     '(config.teacher.checkpoint, then each of config.teachers.more)')
  if t.weights:
    if not all(is_real(w) and w >= 0 for w in t.weights):
      raise ValueError(f'config.teachers.weights must be numbers >= 0, got {tuple(t.weights)}')
    if not math.isclose(sum(t.weights), 1.0, abs_tol=1e-6):
      raise ValueError(f'config.teachers.weights {tuple(t.weights)} sum to {sum(t.weights):g}, '
                       'not 1 (they are the mixture p = sum_i w_i p_i)')
  elif not all(isinstance(r, str) and r for r in t.routes) or len(set(t.routes)) != n:
    raise ValueError(f'config.teachers.routes must be {n} distinct non-empty strings, got '
                     f'{tuple(t.routes)}')


def is_url(entry: str) -> bool:
  """Whether a teachers.more entry names a server (http:// or https://), not a run folder."""
  return isinstance(entry, str) and entry.startswith(('http://', 'https://'))


def route_of(config, task):
  """(split, index) -> the index of that example's teacher, for config.teachers.routes (None
  without routes), checked: the task's rows name only known routes."""
  t = config.teachers
  if not t.routes:
    return None
  values = getattr(task, 'route_values', None)
  if not values:
    raise ValueError(f'config.teachers.routes: the rows of task {task.name!r} name no teacher; '
                     'a JSONL or Parquet source names it in a field '
                     '(task.kwargs.route_field=\'teacher_route\')')
  unknown = sorted(values - set(t.routes))
  if unknown:
    raise ValueError(f'task {task.name!r} routes rows to {unknown}, which no teacher serves: '
                     f'config.teachers.routes is {tuple(t.routes)}')
  index = {value: i for i, value in enumerate(t.routes)}
  return lambda split, i: index[task.route(split, i)]


def _tokenizer_of(checkpoint: str):
  """The tokenizer a teacher was trained with (its run's config.json, or the tokenizer.json
  of a Hugging Face folder); None when the folder says nothing about it."""
  if has_export(checkpoint):
    try:
      with open(os.path.join(checkpoint, 'config.json')) as f:
        folder = json.load(f).get('tokenizer', '')
    except (OSError, ValueError):
      return None
    return HFTokenizer(folder) if folder else CharTokenizer()
  if os.path.isfile(os.path.join(checkpoint, 'tokenizer.json')):
    return HFTokenizer(checkpoint)
  return None


def _tokenizer_differences(student, teacher) -> list[str]:
  """What differs between two tokenizers: sizes, special tokens, chat templates, vocabulary."""
  differences = [f'{name} {getattr(teacher, name)} (the run\'s: {getattr(student, name)})'
                 for name in ('vocab_size', 'bos_id', 'eos_id', 'pad_id')
                 if getattr(teacher, name) != getattr(student, name)]
  template = lambda tok: getattr(getattr(tok, 'chat_template', None), 'source', None)
  if template(teacher) != template(student):
    differences.append('the chat template')
  if not differences and teacher.fingerprint() != student.fingerprint():
    differences.append(f'the vocabulary (fingerprint {teacher.fingerprint()}, the run\'s '
                       f'{student.fingerprint()})')
  return differences


def _names(checkpoints) -> tuple[str, ...]:
  """Metric names: each checkpoint's folder name, made unique by its position."""
  names = [os.path.basename(os.path.normpath(path)) or f'teacher{i}'
           for i, path in enumerate(checkpoints)]
  return tuple(f'{name}.{i}' if names.count(name) > 1 else name for i, name in enumerate(names))


def ensemble(config, tokenizer, task, loaded):
  """(Ensemble, params tuple, route or None) of several loaded teachers, checked: each one's
  tokenizer equals the run's; routed rows name only known routes."""
  checkpoints = (config.teacher.checkpoint, *config.teachers.more)
  for path in checkpoints:
    theirs = _tokenizer_of(path)
    differences = [] if theirs is None else _tokenizer_differences(tokenizer, theirs)
    if differences:
      raise ValueError(f'teacher {path} was trained with another tokenizer than the run\'s: '
                       f'{"; ".join(differences)}. Several teachers must share the student\'s '
                       'tokenizer and special tokens')
  graphdefs, params, model_configs = zip(*loaded)
  t = config.teachers
  mix = teachers_lib.Ensemble(graphdefs=tuple(graphdefs), names=_names(checkpoints),
                              softcaps=tuple(m.final_softcap for m in model_configs),
                              weights=tuple(float(w) for w in t.weights))
  return mix, tuple(params), route_of(config, task)


def served_teachers(config, tokenizer, task, first, vocab_size: int):
  """(ServedTeachers, route or None): config.teacher.server's connected client `first` and
  one per URL of config.teachers.more, each server's tokenizer checked against the run's."""
  clients = [first] + [teacher_client.open_for_run(config, tokenizer, None, url=url)
                       for url in config.teachers.more]
  pool = teacher_pool.ServedTeachers(clients, tuple(float(w) for w in config.teachers.weights),
                                     vocab_size)
  return pool, route_of(config, task)
