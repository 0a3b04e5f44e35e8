"""Rows a teacher computed once into a cache on disk, reused by every run that matches.

The cache (distill.data.teacher_cache: shards, a manifest with the teacher, tokenizer and
task fingerprints, resumable after a kill) is built by the first run that needs it, before
training starts, and reused by every later run whose teacher, tokenizer, task and settings
match (a sweep over student sizes pays for the teacher once); a mismatch is refused with the
field named. Training then reads rows from it and never runs the teacher to make them.

Subclasses set KIND, LABEL, CACHE_SUBDIR and define `identity_settings()` (what the rows
depend on besides teacher, tokenizer and task), `num_rows()` and the pure
`compute(teacher_params, batch, first_row) -> {field: [B, ...]}`.
kwargs of every cache: rows_per_shard (1024), batch_size (rows per teacher pass; 0:
config.data.eval_batch_size), cache_dir ('': WORKDIR/<CACHE_SUBDIR>).
"""
from __future__ import annotations

import os

import jax

from distill.algorithms import hooks
from distill.data import teacher_cache
from distill.parallel import mesh as mesh_lib

CACHE_DEFAULTS = {'rows_per_shard': 1024, 'batch_size': 0, 'cache_dir': ''}


class CacheRows(hooks.Rows):
  KIND = LABEL = CACHE_SUBDIR = ''
  DEFAULTS = CACHE_DEFAULTS
  needs_teacher = True

  def num_rows(self) -> int:
    raise NotImplementedError

  def identity_settings(self) -> dict:
    raise NotImplementedError

  def compute(self, teacher_params, batch, first_row) -> dict:
    raise NotImplementedError

  def check(self) -> None:
    options = self.options
    self.positive_int('rows_per_shard')
    batch_size = options['batch_size'] or self.config.data.eval_batch_size
    data_parallel = mesh_lib.data_parallel_size(self.run.mesh)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size % data_parallel:
      raise self.kwarg_error('batch_size', f'must be an int divisible by the data-parallel size '
                             f'{data_parallel} (0: config.data.eval_batch_size), got {batch_size!r}')
    self.write_batch_size = batch_size
    if not isinstance(options['cache_dir'], str):
      raise self.kwarg_error('cache_dir', f'must be a path, got {options["cache_dir"]!r}')
    self.cache_dir = options['cache_dir'] or os.path.join(self.run.workdir, self.CACHE_SUBDIR)
    available = self.run.task.num_examples('train')
    if self.num_rows() > available:
      raise ValueError(f'{self.LABEL} needs {self.num_rows()} train examples but task '
                       f'{self.run.task.name!r} has {available}')
    self.identity = teacher_cache.run_identity(self.run, self.KIND, self.teacher_fingerprint(),
                                               **self.identity_settings())
    # A cache made for another run is refused now, before anything compiles.
    teacher_cache.check_existing(self.cache_dir, self.identity, num_rows=self.num_rows(),
                                 rows_per_shard=options['rows_per_shard'])

  def teacher_fingerprint(self) -> str:
    """The teacher the rows depend on: the exact bits of its parameters."""
    return teacher_cache.fingerprint_model(self.run.teacher_config, self.run.teacher_params)

  def producer(self):
    """produce(start, stop) -> rows start .. stop-1 (teacher_cache.write's `produce`)."""
    compute = jax.jit(self.compute)   # the teacher is an argument, not a baked-in constant
    return teacher_cache.produce_in_batches(
        self.run, lambda batch, first: compute(self.run.teacher_params, batch, first),
        self.write_batch_size)

  def build_cache(self, stop_after_shards: int | None = None) -> dict:
    """Writes (or finishes, or reuses) the cache; returns its manifest."""
    return teacher_cache.write(self.cache_dir, self.identity, num_rows=self.num_rows(),
                               rows_per_shard=self.options['rows_per_shard'],
                               produce=self.producer(),
                               label=self.LABEL, stop_after_shards=stop_after_shards)

  def train_batches(self, default):
    del default   # the cache replaces the dataset
    self.build_cache()
    source = teacher_cache.RowSource(self.cache_dir, self.identity)
    return teacher_cache.make_iterator(
        source, batch_size=self.config.data.batch_size // jax.process_count(),
        seed=self.config.seed, shard_index=jax.process_index(), shard_count=jax.process_count())
