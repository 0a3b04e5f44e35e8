"""Orbax checkpoints of everything needed to continue a run bit-for-bit.

Each step directory holds the train state (student params, optimiser state, step, rng,
algorithm state), the data iterator's state and the run's identity (model config,
task, tokenizer fingerprint). Restoring into a run whose identity differs is refused
with the differing fields named, and nothing in the workdir is touched.

Once a save is complete its files' checksums are recorded (distill.data.integrity: at the
next save or at close; a step killed before that is trusted as Orbax wrote it). A
resume takes the newest step that verifies and restores; newer ones that do not (torn or
corrupted files) are moved to WORKDIR/corrupt_checkpoints/ with a warning naming the step
and the files, so they are neither read nor overwritten.
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import time
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

from distill.data import integrity

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
    self._unrecorded = collections.deque()   # saved steps whose checksums are not yet written
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            # a save killed half-way leaves a tmp folder: delete it on the next start
            cleanup_tmp_directories=True),
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

  def step_directory(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _record_checksums(self):
    """Records the checksums of the saves made so far, once they are complete (a step kept
    by max_to_keep may be gone by then)."""
    self.manager.wait_until_finished()   # what Orbax's next save waits for anyway
    while self._unrecorded:
      step = self._unrecorded.popleft()
      if jax.process_index() == 0 and os.path.isdir(self.step_directory(step)):
        integrity.record(self.step_directory(step))

  def save(self, step: int, state, data_state: dict | None, *, force: bool = False):
    self._record_checksums()
    items = {'state': ocp.args.StandardSave(state)}
    if data_state is not None:
      items['data'] = ocp.args.JsonSave(data_state)
    self._unrecorded.append(step)
    self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, state_template, shardings, *, with_data: bool = True) -> tuple[Any, dict | None]:
    """The newest intact step's (state, data state); newer broken steps are set aside."""
    items = {'state': ocp.args.StandardRestore(_abstract(state_template, shardings))}
    if with_data:
      items['data'] = ocp.args.JsonRestore()
    broken: dict[int, list[str]] = {}
    for step in sorted(self.manager.all_steps(), reverse=True):
      found = integrity.problems(self.step_directory(step))
      if found:
        broken[step] = found
        continue
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # noqa: BLE001 - decided below: torn only if an older step reads
        broken[step] = [f'{type(e).__name__}: {str(e)[:300]}']
        continue
      # An older step of the same structure read: the newer ones are torn, not this code's.
      self._set_aside(broken)
      return restored['state'], (restored['data'] if with_data else None)
    raise ValueError(f'no checkpoint in {self.directory} can be restored (nothing was moved):\n  '
                     + '\n  '.join(f'step {s}: {"; ".join(p)}' for s, p in broken.items()))

  def _set_aside(self, broken: dict[int, list[str]]):
    if not broken:
      return
    if jax.process_index() == 0:
      aside = os.path.join(os.path.dirname(self.directory), 'corrupt_checkpoints')
      os.makedirs(aside, exist_ok=True)
      for step, found in sorted(broken.items()):
        target = os.path.join(aside, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
        shutil.move(self.step_directory(step), target)
        warnings.warn(f'checkpoint step {step} is torn or corrupt, skipped and moved to {target}: '
                      + '; '.join(found))
    self.manager.reload()

  def wait(self):
    self._record_checksums()

  def close(self):
    self._record_checksums()
    self.manager.close()


def save_params(directory: str, params):
  """Writes final params on their own (what a teacher run hands to its students)."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(directory), params, force=True)
  checkpointer.wait_until_finished()


def load_params(directory: str, abstract_params, shardings):
  checkpointer = ocp.StandardCheckpointer()
  return checkpointer.restore(os.path.abspath(directory), _abstract(abstract_params, shardings))
