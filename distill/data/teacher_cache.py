"""Datasets computed once from a teacher and kept on disk: its top-k log-probs (the
teacher-logit cache) or its own completions (SeqKD). Written once, resumable, checked.

Layout of a cache directory:
  manifest.json           identity (teacher, tokenizer, task, settings), shard layout,
                          counters, and 'complete' (true only once every shard exists)
  shard-00000/FIELD.npy   rows [s·rows_per_shard, (s+1)·rows_per_shard) of each field, one
                          .npy per field, read memory-mapped (random access, nothing loaded)

A writer never leaves a cache that reads as complete before it is: each shard is written to
shard-NNNNN.tmp/ with its files' checksums (distill.data.integrity) and renamed into place
(atomic), the manifest is replaced atomically after each shard, and 'complete': true is
written last. A writer killed at any point leaves whole shards; the next `write` recomputes
only the missing ones (leftover .tmp folders are deleted). Every `write` (each run that uses
the cache) verifies the shards' checksums and computes a torn or corrupted shard again, with
a warning naming it. A cache whose identity differs from the run's is refused, naming the
fields.

Rows are examples 0 .. num_rows-1 of the task's train split in index order, computed in
fixed batches (padded at the end) so a resumed writer computes exactly what an
uninterrupted one would. `write` runs on every process (the teacher is sharded); only
process 0 touches files, so several hosts need a shared filesystem, as for checkpoints.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import warnings
from typing import Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from distill import atomic_file
from distill.data import integrity, pipeline
from distill.parallel import mesh as mesh_lib

MANIFEST = 'manifest.json'
Rows = dict[str, np.ndarray]


class CacheMismatchError(ValueError):
  """The cache on disk was made by another teacher, tokenizer, task or setting."""


# ------------------------------------------------------------------------ identity


@jax.jit
def _checksums(params):
  """Two uint32 sums per leaf of its raw bits: plain and position-weighted (catches swaps)."""
  def one(x):
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f'uint{x.dtype.itemsize * 8}'))
    bits = bits.astype(jnp.uint32).reshape(-1)
    weights = 2 * jnp.arange(bits.size, dtype=jnp.uint32) + 1
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])
  return jax.tree.map(one, params)


def fingerprint_model(model_config, params) -> str:
  """Short hash of a model's architecture and the exact bits of its parameters.

  Computed on device (works for sharded, multi-host params), one pass over the weights.
  """
  sums = jax.device_get(_checksums(params))
  leaves = {jax.tree_util.keystr(path): [int(v) for v in leaf]
            for path, leaf in jax.tree_util.tree_flatten_with_path(sums)[0]}
  blob = json.dumps({'model': dataclasses.asdict(model_config), 'params': leaves},
                    sort_keys=True).encode()
  return 'sha256-' + hashlib.sha256(blob).hexdigest()[:16]


def run_identity(run, kind: str, teacher: str, **settings) -> dict:
  """What a cache made for `run` depends on: the teacher's fingerprint (fingerprint_model, or
  the one a teacher server reports), tokenizer, task (with lengths), settings."""
  identity = {'kind': kind, 'teacher': teacher,
              'tokenizer': run.tokenizer.fingerprint(),
              'task': run.config.task.to_dict(), 'split': 'train', **settings}
  return json.loads(json.dumps(identity))   # as it reads back from the manifest


# ------------------------------------------------------------------------ writing


def read_manifest(directory: str) -> dict | None:
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path} is unreadable ({e}); nothing in {directory} can be trusted '
                     'without it: delete the folder to rebuild the cache') from None


def check_identity(directory: str, manifest: dict, identity: dict) -> None:
  saved = manifest['identity']
  problems = [f'{k}: the cache has {saved.get(k)!r}, this run has {identity.get(k)!r}'
              for k in sorted(set(saved) | set(identity)) if saved.get(k) != identity.get(k)]
  if problems:
    raise CacheMismatchError(
        f'the cache in {directory} was made for a different run; point the algorithm\'s '
        'cache_dir elsewhere or delete it (nothing was changed). Differences:\n  '
        + '\n  '.join(problems))


def check_existing(directory: str, identity: dict, *, num_rows: int,
                   rows_per_shard: int) -> dict | None:
  """The manifest of the cache in `directory` (None if there is none yet); refused with the
  differing fields named if it was made for another identity or layout."""
  manifest = read_manifest(directory)
  if manifest is not None:
    check_identity(directory, manifest, dict(identity, num_rows=num_rows,
                                             rows_per_shard=rows_per_shard))
  return manifest


def _shard_dir(directory: str, shard: int) -> str:
  return os.path.join(directory, f'shard-{shard:05d}')


def _torn_shards(directory: str, num_shards: int) -> set[int]:
  """Shards whose files differ from their recorded checksums (warned, named): rewritten."""
  torn = set()
  for shard in range(num_shards):
    found = integrity.problems(_shard_dir(directory, shard))   # None: absent or unrecorded
    if found:
      warnings.warn(f'{_shard_dir(directory, shard)} is torn or corrupt ({"; ".join(found)}); '
                    'skipping it: it is computed again')
      torn.add(shard)
  return torn


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def write(directory: str, identity: dict, *, num_rows: int, rows_per_shard: int,
          produce: Callable[[int, int], Rows], label: str,
          stop_after_shards: int | None = None) -> dict:
  """Creates, resumes or reuses the cache; returns its manifest.

  produce(start, stop) -> {field: [stop - start, ...] array}: rows start .. stop-1.
  identity: JSON-able dict (see run_identity); the layout is added to it.
  stop_after_shards: write at most this many shards in this call, then return the
  incomplete manifest (a simulated kill, for tests).
  """
  if num_rows < 1 or rows_per_shard < 1:
    raise ValueError(f'{label}: num_rows and rows_per_shard must be >= 1, got {num_rows}, '
                     f'{rows_per_shard}')
  num_shards = -(-num_rows // rows_per_shard)
  writer = jax.process_index() == 0
  _sync('teacher-cache-start')
  manifest = check_existing(directory, identity, num_rows=num_rows,
                            rows_per_shard=rows_per_shard)
  torn = _torn_shards(directory, num_shards)
  if torn and manifest is not None:
    manifest['complete'] = False
  if manifest is not None and manifest['complete']:
    print(f'{label}: reusing {manifest["num_rows"]} rows in {directory}', flush=True)
    return manifest
  if manifest is None:
    manifest = {'identity': dict(identity, num_rows=num_rows, rows_per_shard=rows_per_shard),
                'num_rows': num_rows, 'rows_per_shard': rows_per_shard,
                'num_shards': num_shards, 'fields': {}, 'rows_computed': 0, 'complete': False}
  missing = [s for s in range(num_shards)
             if s in torn or not os.path.isdir(_shard_dir(directory, s))]
  _sync('teacher-cache-listed')
  if writer:
    os.makedirs(directory, exist_ok=True)
    for shard in torn:
      shutil.rmtree(_shard_dir(directory, shard))
    for name in os.listdir(directory):   # shards a killed writer left half-written
      if name.endswith('.tmp') and name.startswith('shard-'):
        shutil.rmtree(os.path.join(directory, name))
    atomic_file.write_json(os.path.join(directory, MANIFEST), manifest, indent=1, sort_keys=True)
  written = 0
  for shard in missing:
    if stop_after_shards is not None and written == stop_after_shards:
      return manifest
    start = shard * rows_per_shard
    stop = min(start + rows_per_shard, num_rows)
    rows = produce(start, stop)
    manifest['rows_computed'] += stop - start
    manifest['fields'] = {k: [list(v.shape[1:]), str(v.dtype)] for k, v in rows.items()}
    if writer:
      tmp = _shard_dir(directory, shard) + '.tmp'
      os.makedirs(tmp)
      for name, value in rows.items():
        np.save(os.path.join(tmp, f'{name}.npy'), value)
      integrity.record(tmp)
      os.rename(tmp, _shard_dir(directory, shard))
      atomic_file.write_json(os.path.join(directory, MANIFEST), manifest, indent=1, sort_keys=True)
    written += 1
  manifest['complete'] = True
  if writer:
    atomic_file.write_json(os.path.join(directory, MANIFEST), manifest, indent=1, sort_keys=True)
  _sync('teacher-cache-done')
  print(f'{label}: wrote {num_rows} rows to {directory} (computed {written} of {num_shards} '
        'shards in this run)', flush=True)
  return manifest


# ------------------------------------------------------------------------ producing rows


def example_rows(run, start: int, stop: int, pad_to: int) -> Rows:
  """Train examples start .. stop-1 in the pipeline's row layout, then padding rows."""
  c = run.config
  lengths = dict(prompt_len=c.task.prompt_len, completion_len=c.task.completion_len)
  rows = [pipeline.encode_example(run.tokenizer, *run.task.example('train', i), **lengths,
                                  name=pipeline.example_name(run.task, 'train', i))
          for i in range(start, stop)]
  rows += [pipeline.padding_example(run.tokenizer, **lengths)] * (pad_to - len(rows))
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def produce_in_batches(run, compute: Callable[[dict, int], dict], batch_size: int):
  """A `produce` for `write`: compute(batch of rows on the mesh, first row) -> {field: [B, ...]}
  over fixed-size batches (the last padded), gathered to host and trimmed."""
  sharding = mesh_lib.batch_sharding(run.mesh)

  def on_mesh(x):
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  def produce(start: int, stop: int) -> Rows:
    parts = []
    for first in range(start, stop, batch_size):
      last = min(first + batch_size, stop)
      batch = {k: on_mesh(v) for k, v in example_rows(run, first, last, batch_size).items()}
      out = multihost_utils.process_allgather(compute(batch, first), tiled=True)
      parts.append({k: np.asarray(v)[:last - first] for k, v in out.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  return produce


# ------------------------------------------------------------------------ reading


class RowSource:
  """Random access to the rows of a complete cache (a grain data source)."""

  def __init__(self, directory: str, identity: dict | None = None):
    manifest = read_manifest(directory)
    if manifest is None or not manifest['complete']:
      state = 'missing' if manifest is None else 'incomplete (its writer was interrupted)'
      raise ValueError(f'the cache in {directory} is {state}; run the writer to finish it')
    if identity is not None:
      check_identity(directory, manifest, dict(identity, num_rows=manifest['num_rows'],
                                               rows_per_shard=manifest['rows_per_shard']))
    self.directory = directory
    self.manifest = manifest
    self.fields = tuple(manifest['fields'])
    self._shards: dict[int, Rows] = {}

  def __len__(self) -> int:
    return self.manifest['num_rows']

  def shard(self, index: int) -> Rows:
    if index not in self._shards:
      self._shards[index] = {
          k: np.load(os.path.join(_shard_dir(self.directory, index), f'{k}.npy'), mmap_mode='r')
          for k in self.fields}
    return self._shards[index]

  def __getitem__(self, row: int) -> Rows:
    shard, offset = divmod(int(row), self.manifest['rows_per_shard'])
    return {k: np.asarray(v[offset]) for k, v in self.shard(shard).items()}


def make_iterator(source: RowSource, *, batch_size: int, seed: int, shard_index: int = 0,
                  shard_count: int = 1) -> grain.DatasetIterator:
  """Shuffled (reseeded every epoch), repeated batches; get_state()/set_state() resume it."""
  rows = -(-(len(source) - shard_index) // shard_count)
  if rows < batch_size:
    raise ValueError(f'the cache in {source.directory} gives this process {rows} rows, fewer '
                     f'than one batch of {batch_size}: make it larger')
  ds = grain.MapDataset.source(source)[shard_index::shard_count].shuffle(seed=seed).repeat(None)
  return iter(ds.batch(batch_size, drop_remainder=True).to_iter_dataset())
