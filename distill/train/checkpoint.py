"""Orbax checkpoints of everything needed to continue a run bit-for-bit.

Each step directory holds the train state (student params, optimiser state, step, rng,
algorithm state), the data iterator's state and the run's identity (model config,
task, tokenizer fingerprint). Restoring into a run whose identity differs is refused
with the differing fields named, and nothing in the workdir is touched.

Once a save is complete its files' checksums are recorded (distill.data.integrity: at the
next save or at close; a step killed before that is trusted as Orbax wrote it). A
resume takes the newest step that verifies and restores; newer ones that do not (torn or
corrupted files) are moved to WORKDIR/corrupt_checkpoints/ with a warning naming the step
and the files, so they are neither read nor overwritten. In a multi-process run every process
restores the same step: one that fails its checks on any process is skipped by all (the
processes agree on each step before any restores it).
"""
from __future__ import annotations

import collections
import json
import math
import os
import shutil
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from distill import atomic_file
from distill.data import integrity

IDENTITY_FILE = 'identity.json'


def _abstract(state, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def identity_mismatch(saved: dict, current: dict) -> list[str]:
  keys = sorted(set(saved) | set(current))
  return [f'{k}: checkpoint has {saved.get(k)!r}, this run has {current.get(k)!r}'
          for k in keys if saved.get(k) != current.get(k)]


def _on_every_process(ok: bool) -> bool:
  """Whether `ok` holds on every process of the run (a collective: all processes call it)."""
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.process_allgather(np.array(ok)).all())


class DiskSpaceError(OSError):
  """The checkpoint directory's disk has less room than the next save needs."""


class Checkpointer:
  """Saves/restores the train state and data-iterator state under workdir/checkpoints.

  Retention: the last `max_to_keep` steps, and with `best_metric` (a metric passed to
  `save`, e.g. 'eval/ce' or 'loss') also the `keep_best` best steps by it ('min' or 'max').
  """

  def __init__(self, workdir: str, identity: dict, *, max_to_keep: int = 2,
               best_metric: str = '', best_mode: str = 'min', keep_best: int = 1):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    # As it reads back from the JSON file (tuples become lists), so the two compare equal.
    self.identity = json.loads(json.dumps(identity))
    self._check_identity()
    self._unrecorded = collections.deque()   # saved steps whose checksums are not yet written
    self.best_metric = best_metric
    policies = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
    if best_metric:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda metrics: metrics[best_metric], reverse=best_mode == 'min',
          n=keep_best, keep_checkpoints_without_metrics=False))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            create=True,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
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
      atomic_file.write_json(path, self.identity, indent=1, sort_keys=True)

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

  def save(self, step: int, state, data_state: dict | None, *, force: bool = False,
           metrics: dict | None = None):
    """metrics: this step's logged values; the best_metric among them ranks the step."""
    self._record_checksums()
    self._check_disk_space(step, state)
    items = {'state': ocp.args.StandardSave(state)}
    if data_state is not None:
      items['data'] = ocp.args.JsonSave(data_state)
    value = (metrics or {}).get(self.best_metric)
    ranked = ({self.best_metric: float(value)}
              if self.best_metric and value is not None and math.isfinite(value) else None)
    self._unrecorded.append(step)
    self.manager.save(step, args=ocp.args.Composite(**items), force=force, metrics=ranked)

  def _check_disk_space(self, step: int, state):
    """Refuses a save the disk cannot hold, before a byte of it is written."""
    # Uncompressed array bytes: an upper bound for float data up to Orbax's small metadata.
    needed = sum(x.nbytes for x in jax.tree.leaves(state)) + (1 << 20)
    free = shutil.disk_usage(self.directory).free
    if free < needed:
      raise DiskSpaceError(
          f'not enough disk for the checkpoint of step {step}: it needs about '
          f'{needed / 2**20:,.1f} MiB, {self.directory} has {free / 2**20:,.1f} MiB free. Free '
          'space, lower config.keep_checkpoints, or point --workdir at a larger disk; the '
          'previous checkpoints are intact.')

  def restore(self, state_template, shardings, *, with_data: bool = True) -> tuple[Any, dict | None]:
    """The newest intact step's (state, data state); newer broken steps are set aside."""
    items = {'state': ocp.args.StandardRestore(_abstract(state_template, shardings))}
    if with_data:
      items['data'] = ocp.args.JsonRestore()
    broken: dict[int, list[str]] = {}
    for step in sorted(self.manager.all_steps(), reverse=True):
      found = integrity.problems(self.step_directory(step))
      # A step torn as any process sees it (e.g. through a stale view of shared storage) is
      # skipped by all of them: they restore one step.
      if not _on_every_process(not found):
        broken[step] = found or ['torn or corrupt as another process reads it']
        continue
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # noqa: BLE001 - decided below: torn only if an older step reads
        if jax.process_count() > 1:
          # Orbax's restore ends at a barrier the others wait at: no process may fall back alone.
          raise RuntimeError(
              f'checkpoint step {step} passed its checks but process {jax.process_index()} '
              f'could not restore it ({type(e).__name__}: {str(e)[:300]}); move '
              f'{self.step_directory(step)} aside and start again to resume from the step '
              'before it') from e
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
    if jax.process_count() > 1:   # no process lists the steps before they are moved
      multihost_utils.sync_global_devices('checkpoint-set-aside')
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
