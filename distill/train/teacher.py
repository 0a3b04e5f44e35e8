"""Runs hand their final params to later runs (a teacher to its students) through
`workdir/model.json` + `workdir/params/`; this module writes and reads that pair."""
from __future__ import annotations

import dataclasses
import json
import os

from jax.sharding import Mesh

from distill.models import ModelConfig, hf, sharded
from distill.parallel import mesh as mesh_lib
from distill.train import checkpoint

MODEL_FILE = 'model.json'
PARAMS_DIR = 'params'


def export_final(workdir: str, model_config: ModelConfig, params):
  checkpoint.save_params(os.path.join(workdir, PARAMS_DIR), params)
  with open(os.path.join(workdir, MODEL_FILE), 'w') as f:
    json.dump(dataclasses.asdict(model_config), f, indent=1)


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
