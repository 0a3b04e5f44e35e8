"""On-policy vs off-policy distillation of one student size, on two embedded tasks.

    .venv/bin/python experiments/onpolicy_comparison/run.py --workdir=workdirs/onpolicy
    (--small: a seconds-long smoke run of the same pipeline)

For each task (arithmetic with working; the HMM language with a known distribution) a
teacher is trained on ground truth once, then the same student architecture is trained
with the same step budget and seeds under seven regimes:
  ground truth      cross-entropy on the dataset, no teacher
  supervised KD     forward KL to the teacher on the dataset's completions
  GKD λ=0           JSD(β=0.5) on the dataset only: separates the divergence from the regime
  GKD λ=0.5         JSD(β=0.5); half the steps on the student's own samples
  GKD λ=1           JSD(β=0.5); every step on the student's own samples
  on-policy RKL     per-token reward −(log q − log p) on the student's samples
  on-policy RKL lr/10  the same at a tenth of the learning rate: a single-sample
                    policy gradient is noisy, and Adam scales noise up to full-size steps
On arithmetic the same regimes also continue, for --warm_steps more, from the ground-truth
student of the same seed (the GKD paper's setting: distillation after supervised training),
in WORKDIR/arithmetic_warm/. Every finished run leaves
WORKDIR/<task>/<regime>/seed<k>/final_metrics.json; a rerun
skips finished runs. The table (mean ± sample standard deviation over seeds) goes to
WORKDIR/results.md and results.json, with the machine and the command.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string('workdir', 'workdirs/onpolicy_comparison', 'Runs and tables.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Student seeds.')
_STEPS = flags.DEFINE_integer('steps', 300, 'Student steps (every regime).')
_TASKS = flags.DEFINE_list('tasks', ['arithmetic', 'hmm'], 'Tasks.')
_WARM = flags.DEFINE_integer('warm_steps', 200, 'Arithmetic, warm start: steps of each regime '
                             'after the ground-truth run of the same seed (0: skip).')
_DIGITS = flags.DEFINE_integer('num_digits', 2, 'Operand digits of the arithmetic task.')
_SMALL = flags.DEFINE_bool('small', False, 'Tiny models, few steps (a smoke test).')

STUDENT, TEACHER = 'student-100k', 'teacher-1m'
REGIMES = ('ground truth', 'supervised KD', 'GKD λ=0', 'GKD λ=0.5', 'GKD λ=1', 'on-policy RKL',
           'on-policy RKL lr/10')
METRICS = {
    'arithmetic': ('accuracy', 'ce', 'kl_forward', 'kl_reverse'),
    'hmm': ('truth_kl_forward', 'truth_kl_reverse', 'student_mass_off_support',
            'sample_distinct_fraction', 'ce', 'kl_forward', 'kl_reverse'),
}


def _common(c, task: str, seed: int):
  """What every run of a task shares: task, seed, evaluation, quiet logging, one device."""
  c.task.name = task
  if task == 'arithmetic':
    with c.unlocked():
      c.task.kwargs.num_digits = _DIGITS.value
  c.seed = seed
  c.mesh.data = 1
  c.progress_bar = False
  c.wandb.mode = 'disabled'
  c.data.eval_batch_size = 64
  c.eval.max_batches = 8          # 512 held-out examples: the whole arithmetic eval split
  if _SMALL.value:
    c.model.preset = 'tiny'
    c.eval.max_batches = 1
    c.data.eval_batch_size = 16
  return c


def teacher_config(task: str):
  from configs import arithmetic_teacher
  c = _common(arithmetic_teacher.get_config('small' if _SMALL.value else None), task, 0)
  c.model.preset = 'tiny' if _SMALL.value else TEACHER
  return c


def student_config(regime: str, task: str, seed: int, teacher_dir: str):
  from configs import arithmetic_gkd, arithmetic_onpolicy_rkl, arithmetic_student
  small = ',small' if _SMALL.value else ''
  if regime == 'ground truth':
    c = arithmetic_student.get_config('scratch' + small)
  elif regime == 'supervised KD':
    c = arithmetic_student.get_config('kd' + small)
    c.loss.kd_weight, c.loss.ce_weight = 1.0, 0.0
  elif regime.startswith('GKD'):
    c = arithmetic_gkd.get_config(small.lstrip(','))
    c.algorithm.kwargs.lmbda = float(regime.split('=')[1])
  else:
    c = arithmetic_onpolicy_rkl.get_config(small.lstrip(','))
    if regime.endswith('lr/10'):
      c.optimizer.learning_rate /= 10
  c = _common(c, task, seed)
  if not _SMALL.value:
    c.model.preset = STUDENT
    c.total_steps = _STEPS.value
    c.checkpoint_steps = _STEPS.value
    c.log_steps = 25
  if regime != 'ground truth':
    c.teacher.checkpoint = teacher_dir
  return c


def _train(config, run_dir: str) -> dict:
  """Trains (or reads the finished) run."""
  from distill.train import trainer
  path = os.path.join(run_dir, 'final_metrics.json')
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  start = time.perf_counter()
  final = trainer.train(config, run_dir)
  final['seconds'] = time.perf_counter() - start
  with open(path, 'w') as f:
    json.dump(final, f, indent=1)
  return final


def _cell(values: list[float], metric: str) -> str:
  if not values:
    return '—'
  pct = metric in ('accuracy', 'sample_distinct_fraction')
  scale, fmt = (100.0, '{:.1f}') if pct else (1.0, '{:.4f}')
  mean = fmt.format(scale * statistics.fmean(values))
  spread = fmt.format(scale * statistics.stdev(values)) if len(values) > 1 else '—'
  return f'{mean} ± {spread}' + ('%' if pct else '')


def tables(results: dict) -> str:
  out = []
  for section, result in results.items():
    metrics = METRICS[result['task']]
    out.append(f'### {section}\n')
    out.append('| regime | ' + ' | '.join(metrics) + ' | seconds/run |')
    out.append('|---|' + '---:|' * (len(metrics) + 1))
    teacher, teacher_preset = result['teacher'], result['teacher_preset']
    for regime, runs in result['regimes'].items():
      cells = [_cell([r[m] for r in runs if m in r], m) for m in metrics]
      seconds = statistics.fmean(r.get('seconds', float('nan')) for r in runs)
      out.append(f'| {regime} (n={len(runs)}) | ' + ' | '.join(cells) + f' | {seconds:.0f} |')
    if teacher is not None:
      cells = [_cell([teacher[m]], m) if m in teacher else '—' for m in metrics]
      out.append(f'| teacher ({teacher_preset}) | ' + ' | '.join(cells) + ' | |')
    out.append('')
  return '\n'.join(out)


def main(argv):
  del argv
  workdir = os.path.abspath(_WORKDIR.value)
  results = {}
  sections = [(task, task, False) for task in _TASKS.value]
  if 'arithmetic' in _TASKS.value and _WARM.value:
    sections.append((f'arithmetic, warm start: {_WARM.value} steps of each regime after the '
                     f'{_STEPS.value} ground-truth steps', 'arithmetic', True))
  for section, task, warm in sections:
    teacher_dir = os.path.join(workdir, task, 'teacher')
    config = teacher_config(task)
    result = results[section] = {'task': task, 'teacher': _train(config, teacher_dir),
                                 'teacher_preset': config.model.preset, 'regimes': {}}
    for regime in REGIMES:
      runs = []
      for seed in map(int, _SEEDS.value):
        name = regime.replace(' ', '_').replace('λ=', 'lambda').replace('/', '_div')
        run_dir = os.path.join(workdir, task + ('_warm' if warm else ''), name, f'seed{seed}')
        print(f'== {section} / {regime} / seed {seed}', flush=True)
        config = student_config(regime, task, seed, teacher_dir)
        if warm:
          config.model.init_from = os.path.join(workdir, task, 'ground_truth', f'seed{seed}')
          config.total_steps = config.checkpoint_steps = _WARM.value
        runs.append(_train(config, run_dir))
      result['regimes'][regime] = runs
  import jax
  machine = (f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, '
             f'jax {jax.__version__} ({jax.default_backend()})')
  command = ' '.join([os.path.relpath(sys.executable)] + sys.argv)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump({'machine': machine, 'command': command, 'results': results}, f, indent=1)
  text = tables(results)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(f'Machine: {machine}\n\nCommand: `{command}`\n\n{text}\n')
  print(text)


if __name__ == '__main__':
  sys.path.insert(0, os.getcwd())
  app.run(main)
