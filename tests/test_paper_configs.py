"""The paper configs (experiments/<paper>/config.py) and the size study's config stay runnable:
each builds its config and sweep, and the sweep plans into distinct runs whose commands name
the config file (no training: the study itself is committed with its results)."""
import importlib.util
import os

import pytest

from distill.sweep import plan as plan_lib
from tests.helpers import REPO

# paper -> runs in its sweep (grid points x 3 seeds)
PAPERS = {'gkd': 27, 'distillm': 12, 'minillm': 12, 'taid': 18, 'abkd': 18, 'seqkd': 6,
          'onpolicy_distillation': 18}


def _load(path: str):
  spec = importlib.util.spec_from_file_location(f'paper_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('paper', sorted(PAPERS))
def test_paper_config_plans_its_grid(paper, tmp_path):
  config_file = f'experiments/{paper}/config.py'
  module = _load(os.path.join(REPO, config_file))
  config = module.get_config('hmm')
  assert config.task.name == 'hmm'
  invocation = plan_lib.Invocation(config_file=f'{config_file}:hmm', overrides={}, cwd=REPO)
  plan = plan_lib.make_plan(config, invocation, str(tmp_path), module.get_sweep('hmm'))
  assert len(plan.runs) == PAPERS[paper]
  assert len({run.workdir for run in plan.runs}) == PAPERS[paper]
  for run in plan.runs:
    assert f'--config={config_file}:hmm' in run.command
    assert run.config.model.init_from.endswith(f'seed={run.config.seed}')
    assert run.config.teacher.checkpoint.endswith('model.preset=teacher-1m')
  assert os.path.exists(os.path.join(REPO, f'experiments/{paper}/README.md'))


def test_the_study_config_refuses_an_ambiguous_arg():
  module = _load(os.path.join(REPO, 'experiments/size_study/config.py'))
  with pytest.raises(ValueError, match='one method and one task'):
    module.get_config('gkd,kd,arithmetic')
  assert module.get_config('gkd,arithmetic4').task.kwargs.num_digits == 4
