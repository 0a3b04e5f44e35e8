"""Orbax checkpoints of everything needed to continue a run bit-for-bit.

Each step directory holds the train state (student params, optimiser state, step, rng,
algorithm state), the data iterator's state and the run's identity (model config,
task, tokenizer fingerprint). Restoring into a run whose identity differs is refused
with the differing fields named, and nothing in the workdir is touched.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

IDENTITY_FILE = 'identity.json'


def _abstract(state, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def identity_mismatch(saved: dict, current: dict) -> list[str]:
  keys = sorted(set(saved) | set(current))
  return [f'{k}: checkpoint has {saved.get(k)!r}, this run has {current.get(k)!r}'
          for k in keys if saved.get(k) != current.get(k)]


class Checkpointer:
  """Saves/restores the train state and data-iterator state under workdir/checkpoints."""

  def __init__(self, workdir: str, identity: dict, *, max_to_keep: int = 2):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    # As it reads back from the JSON file (tuples become lists), so the two compare equal.
    self.identity = json.loads(json.dumps(identity))
    self._check_identity()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )

  def _check_identity(self):
    path = os.path.join(self.directory, IDENTITY_FILE)
    if os.path.exists(path):
      with open(path) as f:
        saved = json.load(f)
      problems = identity_mismatch(saved, self.identity)
      if problems:
        raise ValueError(
            f'the workdir {os.path.dirname(self.directory)} holds checkpoints of an incompatible '
            'run; use a new --workdir (nothing was changed). Differences:\n  ' +
            '\n  '.join(problems))
    elif jax.process_index() == 0:
      os.makedirs(self.directory, exist_ok=True)
      with open(path, 'w') as f:
        json.dump(self.identity, f, indent=1, sort_keys=True)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict | None, *, force: bool = False):
    items = {'state': ocp.args.StandardSave(state)}
    if data_state is not None:
      items['data'] = ocp.args.JsonSave(data_state)
    self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, state_template, shardings, *, with_data: bool = True) -> tuple[Any, dict | None]:
    step = self.manager.latest_step()
    items = {'state': ocp.args.StandardRestore(_abstract(state_template, shardings))}
    if with_data:
      items['data'] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored['state'], (restored['data'] if with_data else None)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def save_params(directory: str, params):
  """Writes final params on their own (what a teacher run hands to its students)."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(directory), params, force=True)
  checkpointer.wait_until_finished()


def load_params(directory: str, abstract_params, shardings):
  checkpointer = ocp.StandardCheckpointer()
  return checkpointer.restore(os.path.abspath(directory), _abstract(abstract_params, shardings))
