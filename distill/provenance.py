"""Lineage of an exported student: which teacher, which data, under which recipe.

`from_run(workdir)` builds the record from what a run leaves in its workdir (config.json, the
run's configuration as the trainer wrote it) and from the files it names: the teacher checkpoint
(name and a SHA-256 of its weight files) and the data files (a SHA-256 each). The exporters
write it: `distill.models.hf.save_hf` the model card `model_card(record)` (README.md: Hugging
Face card metadata and the record as a JSON block) and `distill.models.gguf_export.export_gguf`
the record into the GGUF metadata (general.* keys and the whole record as the JSON string
`distill.provenance`).
`read(path)` gives it back from a GGUF file, an HF folder or a run's workdir.

The record (a JSON object; `schema` counts its versions):
  schema, project {name, version}, role,
  teacher {checkpoint, name, fingerprint, files} (None when trained on ground truth alone),
    plus more_teachers [same] and server {url, model, fingerprint} when the run had them,
  tokenizer {name, fingerprint},
  data [{task, kwargs, fingerprint, files [{path, sha256, bytes}]}],
  method {algorithm, algorithm_kwargs, divergence, kd_weight, ce_weight, temperature,
    temperature_squared_scale, loss_hparams, reduction},
  hyperparameters {student_preset, seed, total_steps, batch_size, learning_rate, warmup_steps,
    final_lr_fraction, weight_decay, clip_norm, quant (when the run set one)},
  config (the run's whole configuration), summary (one line, `summary`).
Fingerprints are 'sha256-' + 16 hex digits: of the sorted (relative path, SHA-256) pairs of a
teacher's weight files (a distill export's model.json and params/, or an HF folder's config.json
and safetensors), of a data file's bytes, or, for the embedded generated tasks, of the task's
name and arguments (which define the data).
"""
from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import json
import os

import gguf

from distill.models import gguf_export

SCHEMA = 1
# The model card's JSON block sits between these two lines.
CARD_BEGIN, CARD_END = '<!-- distill.provenance -->', '<!-- /distill.provenance -->'
# Task names whose kwargs name data files (distill.data.sources); other tasks are generated.
_FILE_TASKS = ('jsonl', 'parquet')
_FILE_KWARGS = ('path', 'eval_path')
_CHUNK = 1 << 20


def project_version() -> str:
  try:
    return importlib.metadata.version('distill')
  except importlib.metadata.PackageNotFoundError:
    return 'unknown (not installed)'


def _sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _short(blob: bytes) -> str:
  return 'sha256-' + hashlib.sha256(blob).hexdigest()[:16]


def _weight_files(folder: str) -> list[str]:
  """The files that hold a checkpoint's weights and architecture, relative to `folder`."""
  from distill.train import teacher as teacher_lib   # train imports models; keep this light
  if teacher_lib.has_export(folder):
    params = os.path.join(folder, teacher_lib.PARAMS_DIR)
    inside = [os.path.relpath(os.path.join(root, name), folder)
              for root, _, names in os.walk(params) for name in names]
    return sorted([teacher_lib.MODEL_FILE] + inside)
  return sorted(name for name in os.listdir(folder) if name == 'config.json'
                or name.endswith(('.safetensors', '.safetensors.index.json')))


def fingerprint_checkpoint(folder: str) -> dict:
  """{checkpoint, name, fingerprint, files} of a teacher checkpoint folder; fingerprint None
  (and `missing` saying so) when the folder is not there any more."""
  out = {'checkpoint': folder, 'name': os.path.basename(os.path.normpath(folder))}
  if not os.path.isdir(folder):
    return {**out, 'fingerprint': None, 'files': 0, 'missing': 'the folder does not exist'}
  files = _weight_files(folder)
  hashes = [[name, _sha256_file(os.path.join(folder, name))] for name in files]
  return {**out, 'fingerprint': _short(json.dumps(hashes).encode()) if files else None,
          'files': len(files)}


def _data_files(kwargs: dict) -> list[str]:
  paths = []
  for key in _FILE_KWARGS:
    value = kwargs.get(key)
    for pattern in [value] if isinstance(value, str) else list(value or ()):
      paths.extend(sorted(glob.glob(pattern)) or [pattern])
  return paths


def fingerprint_data(task: str, kwargs: dict) -> dict:
  """The data source of a task: its files' hashes (file tasks) or the definition's (generated)."""
  out = {'task': task, 'kwargs': kwargs}
  if task not in _FILE_TASKS:
    return {**out, 'files': [], 'fingerprint': _short(json.dumps(
        {'task': task, 'kwargs': kwargs}, sort_keys=True).encode())}
  files = [{'path': p, 'sha256': _sha256_file(p), 'bytes': os.path.getsize(p)}
           if os.path.isfile(p) else {'path': p, 'sha256': None, 'missing': True}
           for p in _data_files(kwargs)]
  return {**out, 'files': files,
          'fingerprint': _short(json.dumps([f['sha256'] for f in files]).encode())}


def _tokenizer(name: str) -> dict:
  from distill.data.hf_tokenizer import HFTokenizer
  from distill.data.tokenizer import CharTokenizer
  if not name:
    return {'name': 'char', 'fingerprint': CharTokenizer().fingerprint()}
  try:
    return {'name': name, 'fingerprint': HFTokenizer(name).fingerprint()}
  except (OSError, ValueError) as e:
    return {'name': name, 'fingerprint': None, 'missing': str(e)}


def build(config: dict) -> dict:
  """The record of a run from its configuration (a dict, as config.json holds it)."""
  teacher = config.get('teacher') or {}
  loss, algorithm = config.get('loss') or {}, config.get('algorithm') or {}
  optimizer, data = config.get('optimizer') or {}, config.get('data') or {}
  task = config.get('task') or {}
  record = {'schema': SCHEMA, 'project': {'name': 'distill', 'version': project_version()},
            'role': config.get('role', 'student')}
  record['teacher'] = (fingerprint_checkpoint(teacher['checkpoint'])
                       if record['role'] == 'student' and teacher.get('checkpoint') else None)
  more = (config.get('teachers') or {}).get('more') or ()
  if more:
    record['more_teachers'] = [fingerprint_checkpoint(path) for path in more]
  if teacher.get('server'):
    record['server'] = {'url': teacher['server'], 'model': teacher.get('server_model', ''),
                        'fingerprint': teacher.get('fingerprint') or None}
  record['tokenizer'] = _tokenizer(config.get('tokenizer', ''))
  record['data'] = [fingerprint_data(task.get('name', ''), task.get('kwargs') or {})]
  record['method'] = {
      'algorithm': algorithm.get('name'), 'algorithm_kwargs': algorithm.get('kwargs') or {},
      **{key: loss.get(key) for key in ('divergence', 'kd_weight', 'ce_weight', 'temperature',
                                        'temperature_squared_scale', 'reduction')},
      'loss_hparams': loss.get('hparams') or {}}
  record['hyperparameters'] = {
      'student_preset': (config.get('model') or {}).get('preset'), 'seed': config.get('seed'),
      'total_steps': config.get('total_steps'), 'batch_size': data.get('batch_size'),
      **{key: optimizer.get(key) for key in ('learning_rate', 'warmup_steps',
                                             'final_lr_fraction', 'weight_decay', 'clip_norm')}}
  if config.get('quant'):
    record['hyperparameters']['quant'] = config['quant']
  record['config'] = config
  record['summary'] = summary(record)
  return record


def from_run(workdir: str) -> dict | None:
  """The record of the run in `workdir` (None when it holds no config.json)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    config = json.load(f)
  if 'architectures' in config:   # a Hugging Face folder's config.json, not a run's
    return None
  return build(config)


def summary(record: dict) -> str:
  """One line: the student's teacher, method and data."""
  teacher = record.get('teacher') or {}
  method = record.get('method') or {}
  data = ', '.join(d.get('task', '?') for d in record.get('data') or ())
  version = f'(distill {record.get("project", {}).get("version")})'
  if not teacher:
    return f'trained on {data} without a teacher, as {record.get("role")} {version}'
  return (f'distilled from {teacher.get("name")} ({teacher.get("fingerprint")}) by '
          f'{method.get("algorithm")} / {method.get("divergence")} on {data} {version}')


# ---- the model card ----------------------------------------------------------------------------

def model_card(record: dict, model_name: str) -> str:
  """README.md: card metadata (YAML front matter), a summary and the record as JSON."""
  teacher = record.get('teacher')
  lines = ['---', 'library_name: transformers', 'tags:', '- distill',
           '- knowledge-distillation']
  if teacher:
    lines += ['base_model:', f'- {json.dumps(teacher["name"])}',
              'base_model_relation: finetune']
  lines += ['datasets:'] + [f'- {json.dumps(d["task"])}' for d in record['data']]
  method, hp = record['method'], record['hyperparameters']
  line = record['summary']
  lines += ['---', '', f'# {model_name}', '', f'{line[0].upper()}{line[1:]}.', '',
            '| | |', '|---|---|']
  rows = [('teacher', f'{teacher["name"]} (`{teacher["fingerprint"]}`)' if teacher else 'none'),
          ('data', ', '.join(f'{d["task"]} (`{d["fingerprint"]}`)' for d in record['data'])),
          ('method', f'{method["algorithm"]}, divergence {method["divergence"]}, '
                     f'temperature {method["temperature"]}'),
          ('steps x batch', f'{hp["total_steps"]} x {hp["batch_size"]}'),
          ('learning rate', hp['learning_rate']),
          ('project', f'distill {record["project"]["version"]}')]
  lines += [f'| {k} | {v} |' for k, v in rows]
  lines += ['', 'The full provenance record (`distill.provenance.read` reads it back):', '',
            CARD_BEGIN, '```json', json.dumps(record, indent=1, sort_keys=True), '```', CARD_END,
            '']
  return '\n'.join(lines)


# ---- reading back -----------------------------------------------------------------------------

def read_gguf(path: str) -> dict | None:
  field = gguf.GGUFReader(path).fields.get(gguf_export.PROVENANCE_KEY)
  return None if field is None else json.loads(field.contents())


def read_card(folder: str) -> dict | None:
  path = os.path.join(folder, 'README.md')
  if not os.path.isfile(path):
    return None
  with open(path, encoding='utf-8') as f:
    text = f.read()
  if CARD_BEGIN not in text or CARD_END not in text:
    return None
  block = text.split(CARD_BEGIN, 1)[1].split(CARD_END, 1)[0].strip()
  return json.loads(block.removeprefix('```json').removesuffix('```'))


def read(path: str) -> dict | None:
  """The record of a GGUF file, an HF folder (model card) or a run's workdir; None if none."""
  if os.path.isfile(path):
    return read_gguf(path)
  return read_card(path) or from_run(path)
