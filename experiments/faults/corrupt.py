"""Torn and corrupt state: files a finished run left are truncated, byte-flipped or removed,
and the run started again must finish as the intact one did, warning and naming what it
skipped (a torn cache manifest is refused with a message instead: nothing in the cache can be
trusted without it).

  newest checkpoint  its array data, data-iterator state or checksum record: the run falls
                     back to the step before, sets the torn one aside and trains on
  cache shard        a teacher-cache or SeqKD-generation shard's file under a fresh run: the
                     shard is computed again
  sweep record       a finished sweep run's final_metrics.json or config.json, or its params
                     export missing: the sweep trains that run again (resumes) and ends with
                     the same table
  metrics.jsonl      a torn last line (a write cut short)
  multi-host         two processes, the newest checkpoint torn as one of them sees it: both
                     restore the step before (experiments/faults/torn_multihost.py)
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile

from distill.parallel import launch
from experiments.faults import kills
from tests.helpers import (REPO, cli_env, flip_middle_byte, largest_file, run_cli,
                           truncate_half)

DAMAGES = {'truncated': truncate_half, 'byte flipped': flip_middle_byte, 'removed': os.remove}


@dataclasses.dataclass
class Case:
  target: str
  damage: str
  ok: bool
  detail: str
  refused: bool = False   # a clear refusal is the designed outcome (a torn cache manifest)


def _rerun(regime: kills.Regime, teacher: str, workdir: str, want: kills.Finish,
           named: list[str]) -> tuple[bool, str]:
  """Runs the regime again in `workdir`; (finished identically and named every string of
  `named` in its warnings, what went wrong or the warning)."""
  proc = run_cli(workdir, *kills.command(regime, teacher), check=False, timeout=kills.TIMEOUT_S)
  if proc.returncode != 0:
    return False, f'failed ({proc.returncode}): ' + ' | '.join(proc.stderr.splitlines()[-3:])
  missing = [n for n in named if n not in proc.stderr]
  problems = kills.differences(kills.finish_of(workdir), want)
  if missing:
    problems.append(f'no warning naming {missing}')
  warned = [line for line in proc.stderr.splitlines() if 'torn or corrupt' in line]
  warning = warned[0].split('Warning: ')[-1][:160] if warned else ''   # without file:line
  return not problems, '; '.join(problems) or warning


def checkpoint_case(root, teacher, refs, part: str, damage: str) -> Case:
  regime = kills.REGIMES[0]
  want = refs[regime][0]
  workdir = os.path.join(root, 'corrupt', f'checkpoint-{part}-{damage}'.replace(' ', '-'))
  shutil.copytree(os.path.join(root, regime.name, 'reference'), workdir)
  newest = os.path.join(workdir, 'checkpoints', str(kills.STEPS))
  path = {'array data': lambda: largest_file(os.path.join(newest, 'state')),
          'iterator state': lambda: largest_file(os.path.join(newest, 'data')),
          'checksum record': lambda: os.path.join(newest, 'checksums.json')}[part]()
  DAMAGES[damage](path)
  ok, detail = _rerun(regime, teacher, workdir, want,
                      [f'checkpoint step {kills.STEPS} is torn', os.path.basename(path)])
  aside = os.path.join(workdir, 'corrupt_checkpoints')
  if ok and not (os.path.isdir(aside) and os.listdir(aside)):
    ok, detail = False, 'the torn step was not kept in corrupt_checkpoints/'
  return Case(f'newest checkpoint ({part})', damage, ok, detail)


def shard_case(root, teacher, refs, regime: kills.Regime, damage: str) -> Case:
  """A fresh run over a copy of the regime's finished cache with shard 3 damaged."""
  want = refs[regime][0]
  workdir = os.path.join(root, 'corrupt', f'{regime.cache_subdir}-{damage}'.replace(' ', '-'))
  cache = os.path.join(workdir, regime.cache_subdir)
  shutil.copytree(os.path.join(root, regime.name, 'reference', regime.cache_subdir), cache)
  target = f'{regime.name} shard' if damage != 'manifest truncated' else f'{regime.name} manifest'
  if damage == 'manifest truncated':
    truncate_half(os.path.join(cache, 'manifest.json'))
    proc = run_cli(workdir, *kills.command(regime, teacher), check=False,
                   timeout=kills.TIMEOUT_S)
    ok = (proc.returncode == 2 and 'manifest.json is unreadable' in proc.stderr
          and 'Traceback' not in proc.stderr)
    return Case(target, 'truncated', ok, proc.stderr.strip().splitlines()[0][:160], refused=True)
  DAMAGES[damage](largest_file(os.path.join(cache, 'shard-00003')))
  ok, detail = _rerun(regime, teacher, workdir, want, ['shard-00003 is torn or corrupt'])
  return Case(target, damage, ok, detail)


def metrics_case(root, teacher, refs) -> Case:
  regime = kills.REGIMES[0]
  workdir = os.path.join(root, 'corrupt', 'metrics-jsonl')
  shutil.copytree(os.path.join(root, regime.name, 'reference'), workdir)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 8, "lo')
  ok, detail = _rerun(regime, teacher, workdir, refs[regime][0], [])
  return Case('metrics.jsonl', 'torn last line', ok, detail)


def multihost_case(root) -> Case:
  workdir = os.path.join(root, 'corrupt', 'multihost')
  with tempfile.TemporaryFile('w+') as out:
    status = launch.wait(launch.start(
        ['-m', 'experiments.faults.torn_multihost', workdir], processes=2, devices_per_process=1,
        cwd=REPO, env=cli_env(), stdout=out, stderr=subprocess.STDOUT, text=True))
    out.seek(0)
    printed = [line for line in out.read().splitlines() if 'restored step' in line]
  return Case('multi-host newest checkpoint', 'torn on process 1 only', status == 0,
              '; '.join(sorted(printed)) or f'exit {status}')


SWEEP = ['--config=configs/arithmetic_student.py:small,scratch', '--sweep=seed=1,2',
         '--config.total_steps=4', '--config.checkpoint_steps=2', '--config.mesh.data=1',
         '--config.eval.generate=False', '--config.data.eval_batch_size=4']


def sweep_cases(root) -> list[Case]:
  """One finished sweep of two runs; each damage in turn, then the sweep again."""
  workdir = os.path.join(root, 'corrupt', 'sweep')
  run_cli(workdir, *SWEEP, module='distill.sweep', timeout=kills.TIMEOUT_S)
  with open(os.path.join(workdir, 'results.json')) as f:
    want = json.load(f)
  runs = [os.path.join(workdir, r['name']) for r in want]
  cases = []
  for run_dir, name, damage in ((runs[0], 'final_metrics.json', 'truncated'),
                                (runs[1], 'config.json', 'byte flipped'),
                                (runs[0], 'model.json', 'removed')):
    path = os.path.join(run_dir, name)
    DAMAGES[damage](path)
    proc = run_cli(workdir, *SWEEP, module='distill.sweep', check=False,
                   timeout=kills.TIMEOUT_S)
    with open(os.path.join(workdir, 'results.json')) as f:
      got = json.load(f)
    retrained = f'sweep: run 1/1: {os.path.basename(run_dir)}' in proc.stdout
    named = name == 'model.json' or f'{path} is torn or corrupt' in proc.stderr
    checks = {f'failed ({proc.returncode})': proc.returncode != 0,
              'not trained again': not retrained, 'no warning naming it': not named,
              'table differs': got != want}
    detail = ('; '.join(k for k, bad in checks.items() if bad)
              or f'{os.path.basename(run_dir)} resumed, table unchanged')
    cases.append(Case(f'sweep record ({name})', damage, not any(checks.values()), detail))
  return cases


def run_all(pool, root: str, teacher: str, refs: dict) -> list[Case]:
  jobs = [pool.submit(checkpoint_case, root, teacher, refs, part, damage)
          for part, damage in (('array data', 'truncated'), ('array data', 'byte flipped'),
                               ('array data', 'removed'), ('iterator state', 'truncated'),
                               ('checksum record', 'truncated'))]
  for regime in kills.REGIMES:
    if regime.shards:
      jobs += [pool.submit(shard_case, root, teacher, refs, regime, damage)
               for damage in (*DAMAGES, 'manifest truncated')]
  jobs += [pool.submit(metrics_case, root, teacher, refs), pool.submit(multihost_case, root),
           pool.submit(sweep_cases, root)]
  cases = []
  for job in jobs:
    result = job.result()
    cases += result if isinstance(result, list) else [result]
  return cases


def _outcome(case: Case) -> str:
  return ('refused clearly' if case.refused else 'recovered') if case.ok else 'NOT RECOVERED'


def line(case: Case) -> str:
  return f'corrupt {case.target}, {case.damage}: {_outcome(case)}: {case.detail}'


def table(cases: list[Case]) -> list[str]:
  lines = ['| state | damage | outcome |', '|---|---|---|']
  lines += [f'| {c.target} | {c.damage} | {_outcome(c)} |' for c in cases]
  tried = len(cases)
  recovered = sum(c.ok and not c.refused for c in cases)
  refused = sum(c.ok and c.refused for c in cases)
  lines.append(f'\ncorruptions tried: {tried}; recovered: {recovered}; refused with a clear '
               f'message (by design): {refused}; neither: {tried - recovered - refused}')
  return lines
