"""The lineage record of an exported student (distill.provenance): built from a run's workdir,
carried by both exporters (HF model card, GGUF metadata) and read back from each."""
import hashlib
import json
import os
import shutil

import gguf
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import distill  # noqa: F401  (flax config)
from distill import convert, provenance
from distill.models import ModelConfig, sharded
from distill.train import config as config_lib
from distill.train import teacher

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'hf')


def student_run(tmp_path):
  """A finished student run: a tiny export plus the config.json the trainer writes, distilled
  from a teacher folder (a copy of the llama fixture) on a JSONL file."""
  teacher_dir = tmp_path / 'Teacher-Llama'
  shutil.copytree(os.path.join(FIXTURES, 'llama'), teacher_dir)
  data = tmp_path / 'train.jsonl'
  data.write_text('{"prompt": "1+1=", "completion": "2"}\n')
  config = config_lib.base_config()
  config.teacher.checkpoint = str(teacher_dir)
  config.tokenizer = str(teacher_dir)
  config.task.name = 'jsonl'
  config.task.kwargs = {'path': str(data)}
  config.algorithm.name = 'gkd'
  config.loss.divergence = 'jsd'
  config.loss.hparams = {'beta': 0.5}
  config.total_steps = 7
  workdir = tmp_path / 'run'
  cfg = ModelConfig(vocab_size=150, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64)
  graphdef, abstract = sharded.abstract_model(cfg)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), abstract)
  teacher.export_final(str(workdir), cfg, nnx.state(nnx.merge(graphdef, params), nnx.Param))
  (workdir / 'config.json').write_text(config.to_json_best_effort(indent=1, sort_keys=True))
  return str(workdir), teacher_dir, data


def test_record_of_a_run(tmp_path):
  workdir, teacher_dir, data = student_run(tmp_path)
  record = provenance.from_run(workdir)
  assert record['schema'] == provenance.SCHEMA and record['project']['name'] == 'distill'
  assert record['project']['version'] == provenance.project_version() != ''
  t = record['teacher']
  assert (t['name'], t['checkpoint'], t['files']) == ('Teacher-Llama', str(teacher_dir), 2)
  assert t['fingerprint'].startswith('sha256-') and len(t['fingerprint']) == 23
  (source,) = record['data']
  assert source['task'] == 'jsonl'
  assert source['files'] == [{'path': str(data), 'bytes': data.stat().st_size,
                              'sha256': hashlib.sha256(data.read_bytes()).hexdigest()}]
  assert record['method']['algorithm'] == 'gkd' and record['method']['divergence'] == 'jsd'
  assert record['method']['loss_hparams'] == {'beta': 0.5}
  assert record['hyperparameters']['total_steps'] == 7
  assert record['tokenizer']['name'] == str(teacher_dir) and record['tokenizer']['fingerprint']
  assert record['config']['teacher']['checkpoint'] == str(teacher_dir)
  assert record['summary'].startswith('distilled from Teacher-Llama (sha256-')
  # The fingerprints follow the bytes: a changed weight file or data file changes them.
  with open(teacher_dir / 'model.safetensors', 'r+b') as f:
    f.seek(-1, os.SEEK_END)
    last = f.read(1)
    f.seek(-1, os.SEEK_END)
    f.write(bytes([last[0] ^ 1]))
  data.write_text('{"prompt": "1+1=", "completion": "3"}\n')
  again = provenance.from_run(workdir)
  assert again['teacher']['fingerprint'] != t['fingerprint']
  assert again['data'][0]['fingerprint'] != source['fingerprint']
  # A teacher folder that is gone is said so, not an error.
  shutil.rmtree(teacher_dir)
  assert provenance.from_run(workdir)['teacher']['missing'] == 'the folder does not exist'


def test_both_exports_carry_the_record(tmp_path, capsys):
  workdir, teacher_dir, _ = student_run(tmp_path)
  record = provenance.from_run(workdir)
  hf_dir, gguf_path = str(tmp_path / 'student-hf'), str(tmp_path / 'student.gguf')
  assert convert.main(['distill-to-hf', '--src', workdir, '--out', hf_dir,
                       '--tokenizer', str(teacher_dir)]) == 0
  assert record['summary'] in capsys.readouterr().out
  card = open(os.path.join(hf_dir, 'README.md')).read()
  assert card.startswith('---\nlibrary_name: transformers\n')
  assert 'base_model:\n- "Teacher-Llama"\n' in card and 'datasets:\n- "jsonl"\n' in card
  assert provenance.read(hf_dir) == record
  assert convert.main(['to-gguf', '--src', workdir, '--out', gguf_path, '--type', 'f32']) == 0
  assert provenance.read(gguf_path) == record
  reader = gguf.GGUFReader(gguf_path)
  general = {k: reader.fields[k].contents() for k in reader.fields if k.startswith('general.')}
  assert general['general.description'] == record['summary']
  assert general['general.base_model.count'] == 1
  assert general['general.base_model.0.name'] == 'Teacher-Llama'
  assert general['general.dataset.0.name'] == 'jsonl'
  assert general['general.tags'] == ['distill', 'knowledge-distillation']
  assert json.loads(reader.fields['distill.provenance'].contents()) == record
  # An HF folder passes its card's record on to the GGUF made from it.
  from_hf = str(tmp_path / 'from_hf.gguf')
  assert convert.main(['to-gguf', '--src', hf_dir, '--out', from_hf, '--type', 'f32']) == 0
  assert provenance.read(from_hf) == record


def test_no_record_where_there_is_none(tmp_path):
  llama = os.path.join(FIXTURES, 'llama')
  assert provenance.read(llama) is None              # an HF folder without a distill card
  assert provenance.read(str(tmp_path)) is None      # an empty folder
  path = str(tmp_path / 'plain.gguf')
  assert convert.main(['to-gguf', '--src', llama, '--out', path, '--type', 'f32']) == 0
  assert provenance.read(path) is None


def test_summary_of_a_run_without_teacher(tmp_path):
  config = json.loads(config_lib.base_config().to_json_best_effort())
  config['role'] = 'teacher'
  record = provenance.build(config)
  assert record['teacher'] is None
  assert record['summary'] == ('trained on arithmetic without a teacher, as teacher (distill '
                               f'{provenance.project_version()})')
  # The embedded tasks are generated: their definition is their fingerprint.
  assert record['data'][0]['files'] == [] and record['data'][0]['fingerprint'].startswith('sha256')
  card = provenance.model_card(record, 'teacher-run')
  assert 'base_model' not in card and provenance.CARD_BEGIN in card
