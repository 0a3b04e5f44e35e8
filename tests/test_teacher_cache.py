"""The teacher cache on disk: resume after a kill equals an uninterrupted write, half-written
caches never read as complete, mismatches are refused by name, readers resume exactly."""
import json
import os

import jax
import numpy as np
import pytest

from distill.data import teacher_cache
from distill.train import run as run_lib
from distill.train import trainer
from tests.helpers import small_config


def random_params(model_config, seed: int, scale: float = 0.1):
  """Gaussian params in the model's layout, drawn by numpy (no RNG program to compile)."""
  from distill.models import sharded
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (scale * rng.standard_normal(a.shape)).astype(a.dtype),
                      sharded.abstract_model(model_config)[1])


def export_random_teacher(workdir: str, seed: int = 1) -> str:
  """A random tiny teacher exported the way a teacher run exports (no training needed)."""
  from distill.data.tokenizer import CharTokenizer
  from distill.models import get_preset
  from distill.train import teacher as teacher_lib
  config = get_preset('tiny', vocab_size=CharTokenizer().vocab_size)
  teacher_lib.export_final(workdir, config, random_params(config, seed, scale=0.3))
  return workdir


@pytest.fixture(scope='module')
def teachers(tmp_path_factory):
  return [export_random_teacher(str(tmp_path_factory.mktemp(f'teacher{s}')), s) for s in (1, 2)]


def cached_algorithm(teacher: str, workdir: str, **kwargs):
  """The rows hook of a validated cached_teacher for a tiny run: 32 rows in 4 shards,
  batches of 8."""
  config = small_config('arithmetic_cached')
  config.teacher.checkpoint = teacher
  config.mesh.data = 1
  config.algorithm.kwargs.update(dict(num_rows=32, rows_per_shard=8, batch_size=8,
                                      cache_dir=os.path.join(workdir, 'cache'), **kwargs))
  return trainer.make_method(run_lib.build_run(config, workdir)).rows


def read_all(directory):
  source = teacher_cache.RowSource(directory)
  shards = [source.shard(s) for s in range(source.manifest['num_shards'])]
  return {k: np.concatenate([s[k] for s in shards]) for k in source.fields}


def test_killed_writer_resumes_to_the_uninterrupted_cache(teachers, tmp_path, capsys):
  straight = cached_algorithm(teachers[0], str(tmp_path / 'straight'))
  straight.build_cache()
  killed = cached_algorithm(teachers[0], str(tmp_path / 'killed'))
  partial = killed.build_cache(stop_after_shards=2)
  assert not partial['complete'] and partial['rows_computed'] == 16
  assert sorted(os.listdir(killed.cache_dir)) == ['manifest.json', 'shard-00000', 'shard-00001']
  with pytest.raises(ValueError, match='incomplete'):
    teacher_cache.RowSource(killed.cache_dir)
  os.makedirs(os.path.join(killed.cache_dir, 'shard-00002.tmp'))   # a shard cut off mid-write
  with open(os.path.join(killed.cache_dir, 'shard-00002.tmp', 'tokens.npy'), 'wb') as f:
    f.write(b'garbage')
  capsys.readouterr()
  manifest = killed.build_cache()
  assert manifest['complete'] and manifest['rows_computed'] == 32   # only the 2 missing shards
  assert 'computed 2 of 4 shards' in capsys.readouterr().out
  assert not any(name.endswith('.tmp') for name in os.listdir(killed.cache_dir))
  a, b = read_all(straight.cache_dir), read_all(killed.cache_dir)
  assert set(a) == {'tokens', 'targets', 'input_mask', 'loss_mask', 'topk_ids', 'topk_logprobs'}
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  # The rows are the pipeline's first 32 train examples, in order; the teacher's top-k sit
  # at completion positions only and hold at most all of its probability.
  rows = teacher_cache.example_rows(straight.run, 0, 32, 32)
  for key in rows:
    np.testing.assert_array_equal(a[key], rows[key])
  on = a['loss_mask'] != 0
  assert a['topk_ids'].shape == (32, straight.run.seq_len, 16)
  assert np.all(a['topk_logprobs'][~on] == 0) and np.all(a['topk_logprobs'][on] < 0)
  assert np.all(np.exp(a['topk_logprobs'][on]).sum(-1) <= 1 + 1e-5)
  assert np.all(np.diff(a['topk_logprobs'][on], axis=-1) <= 0)   # sorted, most likely first
  capsys.readouterr()
  assert killed.build_cache()['rows_computed'] == 32                # reused, nothing computed
  assert 'teacher cache: reusing 32 rows' in capsys.readouterr().out


def test_all_shards_but_no_complete_flag_is_finished_without_recomputing(tmp_path):
  calls = []

  def produce(start, stop):
    calls.append(start)
    return {'x': np.arange(start, stop, dtype=np.int32)[:, None] * np.ones((1, 3), np.int32)}

  directory = str(tmp_path / 'c')
  write = lambda **kw: teacher_cache.write(directory, {'kind': 'test'}, num_rows=10,
                                           rows_per_shard=4, produce=produce, label='t', **kw)
  write()
  assert calls == [0, 4, 8]
  # As a writer killed after its last shard, before 'complete' was written, leaves it.
  path = os.path.join(directory, 'manifest.json')
  manifest = json.load(open(path))
  json.dump(dict(manifest, complete=False), open(path, 'w'))
  with pytest.raises(ValueError, match='incomplete'):
    teacher_cache.RowSource(directory)
  assert write()['complete'] and calls == [0, 4, 8]
  source = teacher_cache.RowSource(directory, {'kind': 'test'})
  assert len(source) == 10 and source[9]['x'].tolist() == [9, 9, 9]


@pytest.mark.parametrize('change, field', [
    ({'kind': 'other'}, 'kind'), ({'teacher': 'sha256-0'}, 'teacher'),
    ({'num_rows': 12}, 'num_rows')])
def test_mismatched_identity_is_refused_by_name(tmp_path, change, field):
  directory = str(tmp_path / 'c')
  identity = {'kind': 'test', 'teacher': 'sha256-1'}
  produce = lambda start, stop: {'x': np.zeros((stop - start, 2), np.float32)}
  settings = dict(num_rows=10, rows_per_shard=4, produce=produce, label='t')
  teacher_cache.write(directory, identity, **settings)
  before = sorted(os.listdir(directory))
  settings['num_rows'] = change.pop('num_rows', 10)
  with pytest.raises(teacher_cache.CacheMismatchError, match=f'{field}: the cache has'):
    teacher_cache.write(directory, dict(identity, **change), **settings)
  assert sorted(os.listdir(directory)) == before


def test_a_different_teacher_or_k_is_refused_before_training(teachers, tmp_path):
  first = cached_algorithm(teachers[0], str(tmp_path))
  first.build_cache(stop_after_shards=1)   # even a partial cache is checked
  with pytest.raises(ValueError, match=r'teacher: the cache has .sha256-'):
    cached_algorithm(teachers[1], str(tmp_path))
  with pytest.raises(ValueError, match='k: the cache has 16, this run has 8'):
    cached_algorithm(teachers[0], str(tmp_path), k=8)


def test_fingerprint_sees_every_bit():
  from distill.models import get_preset
  config = get_preset('tiny', vocab_size=11)
  params = {'a': np.arange(6, dtype=np.float32).reshape(2, 3), 'b': np.ones(4, np.float32)}
  base = teacher_cache.fingerprint_model(config, params)
  assert base == teacher_cache.fingerprint_model(config, {k: v.copy() for k, v in params.items()})
  nudged = dict(params, b=np.nextafter(params['b'], 2.0, dtype=np.float32))
  swapped = dict(params, a=params['a'][::-1].copy())
  other = get_preset('tiny', vocab_size=12)
  assert len({base, teacher_cache.fingerprint_model(config, nudged),
              teacher_cache.fingerprint_model(config, swapped),
              teacher_cache.fingerprint_model(other, params)}) == 4


def test_reader_iterator_resumes_exactly(tmp_path):
  directory = str(tmp_path / 'c')
  produce = lambda start, stop: {'x': np.arange(start, stop, dtype=np.int32)}
  teacher_cache.write(directory, {}, num_rows=13, rows_per_shard=5, produce=produce, label='t')
  source = teacher_cache.RowSource(directory)
  make = lambda: teacher_cache.make_iterator(source, batch_size=4, seed=3)
  it = make()
  seen = [next(it)['x'] for _ in range(3)]
  state = it.get_state()
  rest = [next(it)['x'] for _ in range(4)]
  resumed = make()
  resumed.set_state(state)
  for a in rest:
    np.testing.assert_array_equal(a, next(resumed)['x'])
  epoch = np.concatenate(seen)[:12]   # the first epoch: 12 distinct of the 13 rows
  assert len(set(epoch.tolist())) == 12 and set(epoch.tolist()) <= set(range(13))
  with pytest.raises(ValueError, match='fewer than one batch'):
    teacher_cache.make_iterator(source, batch_size=4, seed=0, shard_index=0, shard_count=5)
