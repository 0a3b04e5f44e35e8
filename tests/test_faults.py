"""Reliability under faults: a second job on a workdir, a stale lock, non-finite steps,
torn checkpoints and caches, a dead tracker, a full disk. The heavy version (many random
kills per data regime) is `make faults` (experiments/faults/run.py)."""
import os
import signal
import subprocess
import sys
import warnings

import pytest

from distill.train import lock as lock_lib
from distill.train import trainer
from tests.helpers import (REPO, flip_middle_byte, largest_file, run_cli, small_config,
                           truncate_half)

STUDENT = '--config=configs/arithmetic_student.py:small,scratch'


@pytest.fixture
def lock_holder(tmp_path):
  """A separate live process holding tmp_path's workdir lock; SIGKILLed at the end."""
  code = ('import sys, time; from distill.train import lock; '
          'lock.WorkdirLock(sys.argv[1]).acquire(); print("held", flush=True); time.sleep(600)')
  proc = subprocess.Popen([sys.executable, '-c', code, str(tmp_path)], cwd=REPO,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == 'held'
  yield proc
  proc.kill()
  proc.wait()


def test_second_job_on_a_workdir_is_refused_naming_the_holder(tmp_path, lock_holder):
  with pytest.raises(lock_lib.WorkdirLockedError, match=f'pid {lock_holder.pid} on host'):
    trainer.train(small_config('arithmetic_student', 'small,scratch'), str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints')   # refused before touching anything
  proc = run_cli(str(tmp_path), STUDENT, check=False)
  assert proc.returncode == 2 and f'pid {lock_holder.pid}' in proc.stderr, proc.stderr
  assert 'Traceback' not in proc.stderr


def test_stale_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, lock_holder):
  lock_holder.send_signal(signal.SIGKILL)
  lock_holder.wait()
  with pytest.warns(UserWarning, match=f'stale lock .*pid {lock_holder.pid}'):
    with lock_lib.WorkdirLock(str(tmp_path)):
      pass
  # Released cleanly: the next holder has nothing to warn about.
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    with lock_lib.WorkdirLock(str(tmp_path)):
      pass


def test_record_of_a_live_holder_refuses_even_where_flock_is_not_enforced(tmp_path):
  """A record naming a live pid on this host (a filesystem without flock) refuses too."""
  import json
  import socket
  with open(tmp_path / lock_lib.LOCK_FILE, 'w') as f:
    json.dump({'pid': os.getppid(), 'host': socket.gethostname(), 'started': 'earlier'}, f)
  with pytest.raises(lock_lib.WorkdirLockedError, match=f'pid {os.getppid()}'):
    lock_lib.WorkdirLock(str(tmp_path)).acquire()


# ---------------------------------------------------------------------- non-finite steps


def _overflowing_config(policy):
  """Step 2 (the first at the peak learning rate) throws the params to ~1e30: every later
  step's loss is not finite."""
  config = small_config('arithmetic_student', 'small,scratch')
  config.optimizer.learning_rate = 1e30
  config.total_steps = 4
  config.checkpoint_steps = 1
  config.keep_checkpoints = 10
  config.nonfinite = policy
  config.mesh.data = 1            # faster to compile; the policy does not depend on it
  config.eval.generate = False
  return config


def _checkpoint_params(workdir, step):
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  params = ocp.StandardCheckpointer().restore(os.path.abspath(path))['params']
  return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_nonfinite_stop_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  import numpy as np
  from distill.train import logging as log_lib
  with pytest.raises(log_lib.NonFiniteLossError, match=r'non-finite grad_norm at step 3'):
    trainer.train(_overflowing_config('stop'), str(tmp_path))
  saved = sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints') if s.isdigit())
  assert saved == [1, 2]
  assert all(np.isfinite(x).all() for x in _checkpoint_params(tmp_path, 2))


def test_nonfinite_skip_keeps_the_state_and_counts_the_steps(tmp_path):
  import numpy as np
  from tests.helpers import read_metrics
  with pytest.warns(UserWarning, match=r'skipped the update of non-finite step\(s\) 3 \('):
    trainer.train(_overflowing_config('skip'), str(tmp_path))
  skipped = {r['step']: r['skipped_steps'] for r in read_metrics(tmp_path) if 'skipped_steps' in r}
  assert skipped == {1: 0, 2: 0, 3: 1, 4: 1}
  after_step_2 = _checkpoint_params(tmp_path, 2)
  assert all(np.isfinite(x).all() for x in after_step_2)
  for a, b in zip(after_step_2, _checkpoint_params(tmp_path, 4), strict=True):
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------- torn or corrupt state


@pytest.mark.parametrize('damage', [truncate_half, flip_middle_byte, os.remove])
def test_torn_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
  """Orbax reads a flipped byte of array data as a valid value: the recorded checksums catch
  it, as they catch truncation and a missing file."""
  import jax.numpy as jnp
  import numpy as np
  from distill.train import checkpoint as ckpt_lib
  state = {'w': jnp.arange(5000, dtype=jnp.float32), 'step': jnp.int32(0)}
  shardings = {k: v.sharding for k, v in state.items()}
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), {'run': 1})
  for step in (1, 2):
    checkpointer.save(step, dict(state, w=state['w'] * step, step=jnp.int32(step)), {'at': step})
  checkpointer.close()
  broken = largest_file(tmp_path / 'checkpoints' / '2')   # the array data
  damage(broken)
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), {'run': 1})
  with pytest.warns(UserWarning, match=r'checkpoint step 2 is torn or corrupt.*' +
                    os.path.basename(broken)):
    restored, data = checkpointer.restore(state, shardings)
  assert data == {'at': 1} and int(restored['step']) == 1
  np.testing.assert_array_equal(restored['w'], np.arange(5000, dtype=np.float32))
  assert os.listdir(tmp_path / 'corrupt_checkpoints')[0].startswith('2-')
  checkpointer.save(2, state, {'at': 2})   # the resumed run saves its own step 2
  checkpointer.close()


def test_torn_cache_shards_are_computed_again_and_a_torn_manifest_refused(tmp_path):
  import numpy as np
  from distill.data import teacher_cache
  calls = []

  def produce(start, stop):
    calls.append(start)
    return {'x': np.arange(start * 50, stop * 50, dtype=np.float32).reshape(-1, 50)}

  directory = str(tmp_path / 'cache')
  write = lambda: teacher_cache.write(directory, {'kind': 'test'}, num_rows=12,
                                      rows_per_shard=4, produce=produce, label='t')
  write()
  flip_middle_byte(os.path.join(directory, 'shard-00001', 'x.npy'))
  truncate_half(os.path.join(directory, 'shard-00002', 'x.npy'))
  calls.clear()
  with pytest.warns(UserWarning, match='shard-00001 is torn or corrupt') as warned:
    assert write()['complete']
  assert calls == [4, 8] and 'shard-00002' in str(warned[1].message)
  source = teacher_cache.RowSource(directory, {'kind': 'test'})
  np.testing.assert_array_equal(np.stack([source[i]['x'] for i in range(12)]),
                                np.arange(600, dtype=np.float32).reshape(12, 50))
  truncate_half(os.path.join(directory, 'manifest.json'))
  with pytest.raises(ValueError, match=r'manifest.json is unreadable .*delete the folder'):
    write()


@pytest.mark.parametrize('damage', [truncate_half, flip_middle_byte])
def test_torn_sweep_records_are_not_finished_runs_and_are_kept(tmp_path, damage):
  """A run killed while writing config.json or final_metrics.json is trained again (resumed),
  not skipped or read; so is one killed between final_metrics.json and its params export."""
  from distill import sweep
  from distill.sweep import tables
  from distill.train import teacher as teacher_lib
  plan = sweep.make_plan(small_config('arithmetic_student', 'small,scratch'),
                         sweep.Invocation('configs/arithmetic_student.py:small,scratch', {}),
                         str(tmp_path), sweep.parse_axis('seed=1,2'))
  for run in plan.runs:   # both finished: records and exported params
    os.makedirs(os.path.join(run.workdir, teacher_lib.PARAMS_DIR))
    for name, text in (('config.json', run.config.to_json_best_effort()),
                       ('final_metrics.json', '{"ce": 1.25, "accuracy": 0.5}'),
                       (teacher_lib.MODEL_FILE, '{}')):
      with open(os.path.join(run.workdir, name), 'w') as f:
        f.write(text)
  first, second = plan.runs
  assert [r.state() for r in plan.runs] == ['finished', 'finished']
  for name in ('final_metrics.json', 'config.json'):
    path = os.path.join(first.workdir, name)
    with open(path, 'rb') as f:
      intact = f.read()
    damage(path)
    with open(path, 'rb') as f:
      damaged = f.read()
    with pytest.warns(UserWarning, match=f'{path} is torn or corrupt'):
      assert first.state() == 'interrupted'
    if name == 'final_metrics.json':
      with pytest.warns(UserWarning, match=f'{path} is torn or corrupt'):
        assert [r['name'] for r in tables.collect(plan.runs)] == [second.name]
    with open(path, 'rb') as f:
      assert f.read() == damaged   # left for the resumed run to rewrite
    with open(path, 'wb') as f:
      f.write(intact)
  os.remove(os.path.join(second.workdir, teacher_lib.MODEL_FILE))   # killed mid-export
  assert [r.state() for r in plan.runs] == ['finished', 'interrupted']


def test_a_record_write_that_fails_midway_leaves_the_previous_record(tmp_path, monkeypatch):
  """Run records go through atomic_file: a write that dies after its bytes went out (here the
  disk fills at fsync) or a value that cannot be serialised leaves the old record whole."""
  import errno
  import json
  from distill import atomic_file
  path = str(tmp_path / 'final_metrics.json')
  atomic_file.write_json(path, {'ce': 1.5}, indent=1)

  def disk_full(fd):
    raise OSError(errno.ENOSPC, 'No space left on device')
  with monkeypatch.context() as patched:
    patched.setattr(os, 'fsync', disk_full)
    with pytest.raises(OSError, match='No space left'):
      atomic_file.write_json(path, {'ce': 0.5, 'padding': 'x' * 100_000}, indent=1)
  with pytest.raises(TypeError, match='not JSON serializable'):
    atomic_file.write_json(path, {'ce': object()})
  with open(path) as f:
    assert json.load(f) == {'ce': 1.5}
  assert os.listdir(tmp_path) == ['final_metrics.json']   # no temp file left behind
  atomic_file.write_json(path, {'ce': 0.5})
  with open(path) as f:
    assert json.load(f) == {'ce': 0.5}


def test_resumed_metrics_drop_later_final_and_torn_lines(tmp_path):
  """A run resumed at its last step logs its final evaluation again: the old one goes, as
  does a last line a kill cut short; a bad line before the end is an error naming it."""
  import json
  from distill.train import logging as log_lib
  rows = [{'step': 2, 'loss': 3.0}, {'step': 4, 'loss': 2.0}, {'step': 4, 'final/ce': 1.5},
          {'step': 6, 'loss': 1.0}]
  path = tmp_path / 'metrics.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows) + '{"step": 6, "lo')
  config = small_config('arithmetic_student', 'small,scratch')
  with pytest.warns(UserWarning, match='dropped its torn last line'):
    log_lib.MetricsWriter(str(tmp_path), config, resume_step=4)
  assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:2]
  path.write_text('{"step": 1, "lo\n{"step": 2}\n')
  with pytest.raises(ValueError, match=r'metrics.jsonl: line 1 is not JSON'):
    log_lib.MetricsWriter(str(tmp_path), config, resume_step=4)


def test_faults_suite_reads_where_a_kill_landed(tmp_path):
  """`make faults` counts kills inside saves and cache writes from what the disk holds."""
  import json
  import random
  from experiments.faults import kills
  regime = next(r for r in kills.REGIMES if r.cache_subdir == 'seqkd')
  assert kills.windows(regime, str(tmp_path)) == []
  os.makedirs(tmp_path / 'checkpoints' / '4.orbax-checkpoint-tmp')
  os.makedirs(tmp_path / 'seqkd' / 'shard-00002.tmp')
  (tmp_path / 'seqkd' / 'manifest.json').write_text(json.dumps({'complete': False}))
  assert kills.windows(regime, str(tmp_path)) == ['checkpoint save', 'cache build',
                                                  'shard files']
  def points(seed):
    rng = random.Random(seed)
    return [kills.kill_point(regime, i, rng, 30.0, str(tmp_path))[0] for i in range(4)]
  points = [points(7), points(7), points(8)]
  assert points[0] == points[1] != points[2]     # seeded: the same kills every time
  assert points[0][0].startswith('time ') and points[0][1].startswith('save of step ')
  assert points[0][2].startswith('shard ') and points[0][3].endswith('+ 0 ms')


# ---------------------------------------------------------------------- disk


def _tiny_state(value):
  import jax.numpy as jnp
  return {'w': jnp.full((1000,), value, jnp.float32), 'step': jnp.int32(0)}


def test_retention_keeps_the_last_n_and_the_best_by_a_metric(tmp_path):
  from distill.train import checkpoint as ckpt_lib
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), {'run': 1}, max_to_keep=2,
                                       best_metric='eval/ce', best_mode='min')
  for step, ce in zip(range(1, 7), [5.0, 1.0, 4.0, float('nan'), 3.0, None]):
    metrics = {'loss': 9.0} if ce is None else {'loss': 9.0, 'eval/ce': ce}
    checkpointer.save(step, _tiny_state(step), None, metrics=metrics)
  checkpointer.close()
  assert ckpt_lib.Checkpointer(str(tmp_path), {'run': 1}).manager.all_steps() == [2, 5, 6]


def test_a_model_too_large_for_the_host_is_refused_before_anything_is_allocated(tmp_path):
  """Found by the fuzz counts (experiments/faults/fuzz.py): model.n_layers=2939983039 spent
  23 GB and 42 s on a per-layer tuple in the config's validation, then went on to fail inside
  XLA. Now the train state's size is checked first, on CPU against the host's memory."""
  from distill.parallel import memory
  config = small_config('arithmetic_student', 'small,scratch')
  config.mesh.data = 1
  config.model.n_layers = 2**40   # a regression: a MemoryError at once, not a 23 GB wait
  with pytest.raises(memory.DoesNotFit, match=r'the train state does not fit: .* per device '
                     r'.*host memory.*model\.n_layers=1099511627776'):
    trainer.train(config, str(tmp_path))


def test_a_save_the_disk_cannot_hold_is_refused_before_writing(tmp_path, monkeypatch):
  import shutil
  from distill.train import checkpoint as ckpt_lib
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), {'run': 1})
  checkpointer.save(1, _tiny_state(1), {'at': 1})
  checkpointer.wait()
  real = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(ckpt_lib.shutil, 'disk_usage', lambda path: real._replace(free=100_000))
  with pytest.raises(ckpt_lib.DiskSpaceError,
                     match=r'checkpoint of step 2: it needs about 1.0 MiB, .* has 0.1 MiB free'):
    checkpointer.save(2, _tiny_state(2), {'at': 2})
  checkpointer.close()
  assert checkpointer.manager.all_steps() == [1]
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', 'identity.json']


# ---------------------------------------------------------------------- tracker down


def test_unreachable_wandb_server_logs_offline_with_one_warning_and_no_wait(tmp_path, monkeypatch):
  import socket
  import time
  from distill.train import logging as log_lib
  with socket.socket() as s:   # a port nothing listens on
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  monkeypatch.delenv('WANDB_MODE', raising=False)
  monkeypatch.setenv('WANDB_API_KEY', 'a' * 40)
  monkeypatch.setenv('WANDB_BASE_URL', f'http://127.0.0.1:{port}')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  config = small_config('arithmetic_student', 'small,scratch')
  config.wandb.mode = 'online'
  start = time.monotonic()
  with pytest.warns(UserWarning, match=r'unreachable .*`wandb sync .*offline-run-\*`') as warned:
    writer = log_lib.MetricsWriter(str(tmp_path), config)
    writer.write(1, {'loss': 1.5})
    writer.close()
  # W&B alone retries the dead server for its whole init_timeout (30 s) before failing.
  assert time.monotonic() - start < 25
  assert len([w for w in warned if 'W&B' in str(w.message)]) == 1
  assert writer._wandb.settings.mode == 'offline'
  assert any(name.startswith('offline-run-') for name in os.listdir(tmp_path / 'wandb'))
  with open(tmp_path / 'metrics.jsonl') as f:
    assert f.read() == '{"step": 1, "loss": 1.5}\n'
