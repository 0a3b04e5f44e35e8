"""Served on-policy scoring vs in-process: the time of one training step.

    .venv/bin/python experiments/served_teacher/onpolicy_bench.py --out=experiments/served_teacher

A random tiny teacher (the arithmetic configs' 'tiny' preset) exported like a run and served
by `python -m distill.serve` in its own process. In this process, for each method, the
step of configs/arithmetic_onpolicy_rkl.py:small (onpolicy_rkl: each sampled token's
log-prob) and configs/arithmetic_gkd.py:small at λ = 1 with forward KL (served: top-k
forward KL, k=16, tail bucket) is built as the trainer builds it, with the teacher
in-process and served (distill.train.step.HostScoredStep: draw, the samples scored by the
server, update); each step is timed to completion (block_until_ready) and the median of
--steps steps after two warm-up steps (compilation) is reported, in-process and served
alternating per method in the same process. Writes onpolicy-results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from bench import REPO, export_teacher, start_server  # noqa: E402
from distill.parallel import mesh as mesh_lib  # noqa: E402
from distill.train import optimizer as opt_lib  # noqa: E402
from distill.train import run as run_lib  # noqa: E402
from distill.train import state as state_lib  # noqa: E402
from distill.train import step as step_lib  # noqa: E402
from distill.train import trainer  # noqa: E402


def config_of(module: str, teacher: str, url: str):
  import importlib
  config = importlib.import_module(f'configs.{module}').get_config('small')
  config.mesh.data = 1
  config.teacher.checkpoint, config.teacher.server = teacher, url
  if module == 'arithmetic_gkd':
    config.loss.divergence = 'forward_kl'
    with config.unlocked():
      config.algorithm.kwargs.update(lmbda=1.0, **({'k': 16, 'tail': 'bucket'} if url else {}))
  return config


def step_seconds(config, workdir: str, steps: int) -> list[float]:
  run = run_lib.build_run(config, workdir)
  method = trainer.make_method(run)
  optimizer = opt_lib.make_optimizer(run.config)
  state, shardings, graphdef = state_lib.create_train_state(
      run.model_config, optimizer, jax.random.PRNGKey(0), run.mesh,
      algo_state_fn=lambda: method.init_state(optimizer))
  step_fn = step_lib.make_step(run.config, run, method, graphdef, shardings, optimizer)
  batches, times = run_lib.train_iterator(run), []
  for i in range(steps + 2):
    batch = run_lib.to_global(next(batches), mesh_lib.batch_sharding(run.mesh))
    start = time.perf_counter()
    state, metrics = step_fn(state, run.teacher_params, batch)
    jax.block_until_ready((state, metrics))
    if i >= 2:   # the first two compile
      times.append(time.perf_counter() - start)
  return times


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument('--out', default=HERE)
  p.add_argument('--steps', type=int, default=20)
  args = p.parse_args(argv)
  os.chdir(REPO)
  root = tempfile.mkdtemp(prefix='served-onpolicy-')
  teacher = export_teacher(os.path.join(root, 'teacher'), 'tiny')
  proc, url = start_server(teacher, 0.0)
  results = {'steps': args.steps, 'load_before': os.getloadavg()[0], 'methods': {}}
  try:
    for module in ('arithmetic_onpolicy_rkl', 'arithmetic_gkd'):
      row = {}
      for name, (checkpoint, server) in (('in_process', (teacher, '')), ('served', ('', url))):
        times = step_seconds(config_of(module, checkpoint, server),
                             os.path.join(root, f'{module}-{name}'), args.steps)
        row[name] = {'median_s': statistics.median(times), 'min_s': min(times),
                     'max_s': max(times)}
      row['overhead_s'] = row['served']['median_s'] - row['in_process']['median_s']
      results['methods'][module] = row
      print(module, json.dumps(row), flush=True)
  finally:
    proc.terminate()
    proc.wait()
  results['load_after'] = os.getloadavg()[0]
  with open(os.path.join(args.out, 'onpolicy-results.json'), 'w') as f:
    json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
