"""A checkpoint written on 8 devices resumes on 2 and back (Orbax restores each array into the
new mesh's shardings), continuing the loss curve of the uninterrupted 8-device run. Onto 2
processes x 2 devices and back: experiments/sharding_matrix/restore_hosts.py."""
import json
import os
import shutil

import numpy as np

from distill.train import trainer
from tests.helpers import read_metrics, small_config

MARK = 'logged_before_the_move'


def _config(devices: int):
  config = small_config('arithmetic_student', 'small,scratch')   # 6 steps, logged every 2
  config.mesh.data = devices
  config.checkpoint_steps, config.keep_checkpoints = 2, 3
  config.eval.generate = False
  return config


def rewind(workdir, step: int):
  """The workdir as a run killed after checkpoint `step` leaves it; the lines logged until
  then are marked, so the resumed run shows it kept them (a fresh start would rewrite them)."""
  for name in os.listdir(os.path.join(workdir, 'checkpoints')):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(os.path.join(workdir, 'checkpoints', name))
  for name in ('params', 'model.json', 'final_metrics.json'):
    path = os.path.join(workdir, name)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  rows = [dict(r, **{MARK: True}) for r in read_metrics(workdir) if r['step'] <= step]
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)


def logged_losses(workdir):
  return [(r['step'], r['loss']) for r in read_metrics(workdir) if 'loss' in r]


def test_checkpoint_moves_from_8_devices_to_2_and_back(tmp_path):
  straight, moved = str(tmp_path / 'straight'), str(tmp_path / 'moved')
  trainer.train(_config(8), straight)
  shutil.copytree(straight, moved)
  rewind(moved, 2)
  trainer.train(_config(2), moved)       # steps 3-6 on 2 devices, from the 8-device step 2
  rewind(moved, 4)
  trainer.train(_config(8), moved)       # steps 5-6 on 8 devices, from the 2-device step 4
  assert [r['step'] for r in read_metrics(moved) if r.get(MARK)] == [2, 4]
  want, got = logged_losses(straight), logged_losses(moved)
  assert [s for s, _ in got] == [s for s, _ in want] == [2, 4, 6]
  np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=2e-5)
