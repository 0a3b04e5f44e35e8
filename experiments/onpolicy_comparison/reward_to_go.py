"""Warm-started on-policy reverse KL on arithmetic: per-token reward vs reward-to-go, two lrs.

    .venv/bin/python experiments/onpolicy_comparison/reward_to_go.py \
        --workdir=workdirs/onpolicy_comparison

Reuses run.py's teacher, ground-truth students and run layout (same workdir: finished runs
are skipped). For each seed it trains (or reads) the teacher and the ground-truth student
(run.py's `--steps`), measures that student's starting point with the teacher's KLs (one step
at lr 1e-12), then continues it for run.py's `--warm_steps` under on-policy RKL with
reward_to_go ∈ {False, True} × lr ∈ {2e-3, 2e-4}, evaluating every 50 steps. Writes
WORKDIR/reward_to_go.json (every run's final metrics, and the eval trajectory) and prints the
table (mean ± sample sd over seeds, then the per-seed values).
"""
from __future__ import annotations

import json
import os
import statistics
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (run.py's flags: --workdir, --seeds, --steps, --warm_steps, ...)

_CELLS = flags.DEFINE_list('cells', ['False:2e-3', 'False:2e-4', 'True:2e-3', 'True:2e-4'],
                           'reward_to_go:learning_rate pairs, in the order they run.')
METRICS = ('accuracy', 'ce', 'kl_forward', 'kl_reverse')


def _trajectory(run_dir: str) -> list[tuple[int, float]]:
  """(step, eval accuracy) pairs from the run's metrics log, if the log has them."""
  out = []
  for name in sorted(os.listdir(run_dir)):
    if name.endswith('.jsonl'):
      with open(os.path.join(run_dir, name)) as f:
        for line in f:
          row = json.loads(line)
          for key in ('eval/accuracy', 'final/accuracy'):
            if key in row:
              out.append((row.get('step'), row[key]))
  return out


def main(argv):
  del argv
  workdir = os.path.abspath(run._WORKDIR.value)
  teacher_dir = os.path.join(workdir, 'arithmetic', 'teacher')
  run._train(run.teacher_config('arithmetic'), teacher_dir)
  cells = {'start (ground-truth student)': []}
  cells.update({c: [] for c in _CELLS.value})
  trajectories = {}
  for seed in map(int, run._SEEDS.value):
    gt_dir = os.path.join(workdir, 'arithmetic', 'ground_truth', f'seed{seed}')
    run._train(run.student_config('ground truth', 'arithmetic', seed, teacher_dir), gt_dir)
    for cell in cells:
      start = cell.startswith('start')
      config = run.student_config('on-policy RKL', 'arithmetic', seed, teacher_dir)
      config.model.init_from = gt_dir
      config.total_steps = config.checkpoint_steps = 1 if start else run._WARM.value
      if start:
        config.optimizer.learning_rate = 1e-12
        name = 'start'
      else:
        rtg, lr = cell.split(':')
        config.optimizer.learning_rate = float(lr)
        config.eval_steps = 50
        with config.unlocked():
          config.algorithm.kwargs.reward_to_go = rtg == 'True'
        # run.py's names for its two on-policy RKL regimes, so either script reuses the other's
        name = {('False', 2e-3): 'on-policy_RKL', ('False', 2e-4): 'on-policy_RKL_lr_div10'}.get(
            (rtg, float(lr)), f'on-policy_RKL_rtg{rtg}_lr{lr}')
      run_dir = os.path.join(workdir, 'arithmetic_warm', name, f'seed{seed}')
      print(f'== {cell} / seed {seed} -> {run_dir}', flush=True)
      cells[cell].append(run._train(config, run_dir))
      trajectories[f'{cell} seed{seed}'] = _trajectory(run_dir)
  with open(os.path.join(workdir, 'reward_to_go.json'), 'w') as f:
    json.dump({'command': ' '.join([os.path.relpath(sys.executable)] + sys.argv),
               'cells': cells, 'trajectories': trajectories}, f, indent=1)
  print('| reward_to_go:lr | ' + ' | '.join(METRICS) + ' |\n|---|' + '---:|' * len(METRICS))
  for cell, runs in cells.items():
    print(f'| {cell} | ' + ' | '.join(run._cell([r[m] for r in runs], m) for m in METRICS) + ' |')
  print('\nper seed (' + ', '.join(run._SEEDS.value) + '):')
  for cell, runs in cells.items():
    print(f'| {cell} | ' + ' | '.join(
        ' / '.join(f'{r[m]:.3f}' for r in runs) for m in METRICS) + ' |')
  for key, traj in trajectories.items():
    print(key, ' '.join(f'{s}:{a:.3f}' for s, a in traj))


if __name__ == '__main__':
  sys.path.insert(0, os.getcwd())
  app.run(main)
