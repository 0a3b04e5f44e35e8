"""Kill anywhere: a data regime's tiny CLI run SIGKILLed at a seeded random point, restarted to
completion and compared bit for bit with the regime's uninterrupted run.

Kill points, in turn (seeded per regime):
  time   a random moment of the run (start-up, compilation, the cache, steps, evaluations,
         saves, the final export), uniform over 5 .. 90% of the uninterrupted run's wall time;
  save   a random delay (0 .. 150 ms, about a save's length here) after a random checkpoint
         step's save has begun (its `STEP.orbax-checkpoint-tmp` folder appeared);
  write  (teacher cache, SeqKD; twice in turn) a random delay (0 .. 20 ms), then none, after
         a random shard of the cache began (its `shard-NNNNN.tmp` folder or the shard
         appeared; polled every 0.5 ms), else
  step   a random delay (0 .. 100 ms) after a random step was logged.
Once the process is dead the disk says where the kill landed (`windows`): inside a checkpoint
save, a checksum record, the cache or SeqKD build, a shard's files, the final params export.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import time

import numpy as np

from tests.helpers import read_metrics, run_cli, run_cli_killed

STEPS, CHECKPOINT_STEPS = 8, 2
COMMON = ['--config.mesh.data=1', '--config.eval.generate=False', '--config.log_steps=1',
          f'--config.total_steps={STEPS}', f'--config.checkpoint_steps={CHECKPOINT_STEPS}',
          '--config.data.eval_batch_size=4']
TIMEOUT_S = 3600   # a tiny run takes seconds, many minutes on a saturated machine


@dataclasses.dataclass(frozen=True)
class Regime:
  name: str
  args: tuple
  cache_subdir: str = ''   # the teacher cache / SeqKD data it writes under its workdir
  shards: int = 0


REGIMES = [
    Regime('supervised', ('--config=configs/arithmetic_student.py:small',)),
    Regime('cached teacher', ('--config=configs/arithmetic_cached.py:small',
                              '--config.algorithm.kwargs.num_rows=64',
                              '--config.algorithm.kwargs.rows_per_shard=8'), 'teacher_cache', 8),
    Regime('SeqKD', ('--config=configs/arithmetic_seqkd.py:small',
                     '--config.algorithm.kwargs.num_prompts=32',
                     '--config.algorithm.kwargs.rows_per_shard=4'), 'seqkd', 8),
    Regime('GKD', ('--config=configs/arithmetic_gkd.py:small', '--config.data.batch_size=4')),
    # The replay buffer fills from the first steps on (φ grows at every evaluation, each
    # step), so steps redone after a resume replay from a restored buffer.
    Regime('DistiLLM', ('--config=configs/arithmetic_distillm.py:small',
                        '--config.data.batch_size=4', '--config.eval_steps=1',
                        '--config.algorithm.kwargs.capacity=8',
                        '--config.algorithm.kwargs.loss_eps=-1e9',
                        '--config.algorithm.kwargs.threshold_step=0.5')),
]


def command(regime: Regime, teacher: str) -> list[str]:
  return [*regime.args, *COMMON, f'--config.teacher.checkpoint={teacher}']


@dataclasses.dataclass
class Finish:
  """What a finished run left: the comparable part of its outputs."""
  params: list
  metrics: list
  final: dict


def finish_of(workdir: str) -> Finish:
  from distill.parallel import mesh as mesh_lib
  from distill.train import teacher as teacher_lib
  import jax
  _, params, _ = teacher_lib.load_exported(workdir, mesh_lib.make_mesh({'data': 1}))
  # Wall-clock throughput is the one logged value that may differ.
  metrics = [{k: v for k, v in r.items() if k != 'tokens_per_s'} for r in read_metrics(workdir)]
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    final = json.load(f)
  return Finish([np.asarray(x) for x in jax.tree.leaves(jax.device_get(params))], metrics, final)


def differences(got: Finish, want: Finish) -> list[str]:
  out = []
  if len(got.params) != len(want.params) or not all(
      a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(got.params, want.params)):
    out.append('params differ')
  if got.metrics != want.metrics:
    out.append(f'metrics.jsonl differs ({len(got.metrics)} vs {len(want.metrics)} rows)')
  if got.final != want.final:
    out.append('final_metrics.json differs')
  return out


def reference(regime: Regime, teacher: str, workdir: str) -> tuple[Finish, float]:
  """The uninterrupted run's outputs and wall time."""
  start = time.monotonic()
  run_cli(workdir, *command(regime, teacher), timeout=TIMEOUT_S)
  return finish_of(workdir), time.monotonic() - start


def _exists(*paths: str):
  return lambda: any(os.path.exists(p) for p in paths)


def _logged(workdir: str, step: int):
  path, needle = os.path.join(workdir, 'metrics.jsonl'), f'"step": {step},'

  def when():
    if not os.path.exists(path):
      return False
    with open(path) as f:
      return needle in f.read()
  return when


def _after(seconds: float):
  """True `seconds` after its first call (made as the run starts)."""
  start = []

  def when():
    if not start:
      start.append(time.monotonic())
    return time.monotonic() - start[0] >= seconds
  return when


def kill_point(regime: Regime, index: int, rng: random.Random, ref_seconds: float,
               workdir: str) -> tuple[str, dict]:
  """(description, run_cli_killed keyword arguments) of the `index`-th kill of a regime."""
  kind = ('time', 'save', 'write', 'write at once')[index % 4]
  if kind == 'time':
    at = rng.uniform(0.05, 0.9) * ref_seconds
    return f'time {at:.2f} s', {'when': _after(at)}
  if kind == 'save':
    step = rng.choice(range(CHECKPOINT_STEPS, STEPS + 1, CHECKPOINT_STEPS))
    delay = rng.uniform(0, 0.15)
    folder = os.path.join(workdir, 'checkpoints', f'{step}.orbax-checkpoint-tmp')
    return (f'save of step {step} + {delay * 1e3:.0f} ms',
            {'when': _exists(folder), 'delay_s': delay, 'poll_s': 0.002})
  if regime.shards:
    shard = rng.randrange(regime.shards)
    delay = rng.uniform(0, 0.02) if kind == 'write' else 0.0
    base = os.path.join(workdir, regime.cache_subdir, f'shard-{shard:05d}')
    return (f'shard {shard} + {delay * 1e3:.0f} ms',
            {'when': _exists(base + '.tmp', base), 'delay_s': delay, 'poll_s': 0.0005})
  step = rng.randint(1, STEPS)
  delay = rng.uniform(0, 0.1)
  return (f'step {step} logged + {delay * 1e3:.0f} ms',
          {'when': _logged(workdir, step), 'delay_s': delay, 'poll_s': 0.005})


def windows(regime: Regime, workdir: str) -> list[str]:
  """Where a dead run was killed, as its files show."""
  found = []
  checkpoints = os.path.join(workdir, 'checkpoints')
  steps = os.listdir(checkpoints) if os.path.isdir(checkpoints) else []
  if any('orbax-checkpoint-tmp' in name for name in steps):
    found.append('checkpoint save')
  if any(os.path.exists(os.path.join(checkpoints, s, 'checksums.json.tmp')) for s in steps):
    found.append('checksum record')
  cache = os.path.join(workdir, regime.cache_subdir)
  if regime.cache_subdir and os.path.exists(os.path.join(cache, 'manifest.json')):
    with open(os.path.join(cache, 'manifest.json')) as f:
      if not json.load(f)['complete']:
        found.append('cache build')
    if any(n.startswith('shard-') and n.endswith('.tmp') for n in os.listdir(cache)):
      found.append('shard files')
  if os.path.exists(os.path.join(workdir, 'params.orbax-checkpoint-tmp')):
    found.append('params export')
  return found


@dataclasses.dataclass
class KillResult:
  regime: str
  point: str
  landed: bool            # the run was still going when killed
  windows: list
  identical: bool
  problems: list


def kill_and_finish(regime: Regime, teacher: str, workdir: str, point: str, kwargs: dict,
                    want: Finish) -> KillResult:
  """Kills a run at `point`, restarts it with the same command, compares with `want`."""
  args = command(regime, teacher)
  try:
    killed = run_cli_killed(workdir, *args, timeout=TIMEOUT_S, **kwargs)
  except AssertionError as e:   # it failed on its own before the kill
    return KillResult(regime.name, point, False, [], False, [str(e)[-300:]])
  landed = killed.returncode != 0
  where = windows(regime, workdir) if landed else []
  restarted = run_cli(workdir, *args, check=False, timeout=TIMEOUT_S)
  if restarted.returncode != 0:
    tail = restarted.stderr.strip().splitlines()[-3:]
    return KillResult(regime.name, point, landed, where, False,
                      [f'restart failed ({restarted.returncode}): ' + ' | '.join(tail)])
  problems = differences(finish_of(workdir), want)
  return KillResult(regime.name, point, landed, where, not problems, problems)
