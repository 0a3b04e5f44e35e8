"""What GGUF quantization costs a distilled student, and what quantization-aware distillation
(QAD, config.quant.type) wins back. See README.md.

    python experiments/quantized_student/run.py --workdir=runs/quantized_student \
        --out=experiments/quantized_student/results.json

1. a teacher (configs/arithmetic_teacher.py, teacher-1m) trained on the arithmetic task;
2. per seed, a student of d_model 256 (every row fits a 256-block, so the K-quants apply)
   distilled from it (configs/arithmetic_student.py, forward KL + CE);
3. per seed, three fine-tunes of that student for --finetune_steps more steps, the same
   distillation: with QAD at q4_k_m, with QAD at q4_0, and without quantization (the control:
   what the extra steps alone do);
4. every student exported to GGUF (f16, q8_0, q6_k, q4_k_m, q4_0 for the distilled one; its own
   type for each QAD fine-tune, q4_k_m and q4_0 for the control) and evaluated by
   `python -m distill.evaluate` (distill.eval.quantized) against the teacher and the distilled
   fp32 student: accuracy, CE, KL, top-1 agreement, size; the llama.cpp column when
   llama-cpp-python is importable; and every student's fp32 weights the same way.
Finished runs are not retrained (a rerun re-evaluates them). The Markdown tables: `table` (every
student and format) and `recovery` (per 4-bit type: the cost of quantizing, and control - QAD
paired by seed); both mean ± sample SD over seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import arithmetic_student, arithmetic_teacher  # noqa: E402
from distill.data.tokenizer import CharTokenizer  # noqa: E402
from distill.eval import quantized  # noqa: E402
from distill.models import gguf_export  # noqa: E402
from distill.parallel import mesh as mesh_lib  # noqa: E402
from distill.train import teacher as teacher_lib  # noqa: E402
from distill.train import trainer  # noqa: E402

STUDENT = dict(d_model=256, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=512, head_dim=64)
FORMATS = ('f16', 'q8_0', 'q6_k', 'q4_k_m', 'q4_0')
QAD_TYPES = ('q4_k_m', 'q4_0')


def _train(config, workdir: str) -> float:
  """Trains unless finished; the wall-clock seconds of the training (kept beside the run, so a
  rerun that only re-evaluates still reports them)."""
  seconds_path = os.path.join(workdir, 'train_seconds.json')
  if os.path.exists(os.path.join(workdir, 'final_metrics.json')):
    if os.path.exists(seconds_path):
      with open(seconds_path) as f:
        return json.load(f)
    return float('nan')
  start = time.time()
  trainer.train(config, workdir)
  seconds = time.time() - start
  with open(seconds_path, 'w') as f:
    json.dump(seconds, f)
  return seconds


def teacher(args) -> tuple[str, float]:
  c = arithmetic_teacher.get_config()
  c.total_steps, c.checkpoint_steps = args.teacher_steps, args.teacher_steps
  c.wandb.mode, c.progress_bar = 'disabled', False
  workdir = os.path.join(args.workdir, 'teacher')
  seconds = _train(c, workdir)
  print(f'teacher: {seconds:.0f} s', flush=True)
  return workdir, seconds


def student_config(args, teacher_dir: str, seed: int, steps: int):
  c = arithmetic_student.get_config('kd')
  c.seed, c.teacher.checkpoint = seed, teacher_dir
  c.model.preset = 'student-500k'
  for key, value in STUDENT.items():
    c.model[key] = value
  c.total_steps, c.checkpoint_steps = steps, steps
  c.wandb.mode, c.progress_bar = 'disabled', False
  return c


def export(workdir: str, file_type: str) -> str:
  path = os.path.join(workdir, f'student-{file_type}.gguf')
  if not os.path.exists(path):
    graphdef, params, _ = teacher_lib.load_exported(workdir, mesh_lib.make_mesh({'data': 1}))
    with warnings.catch_warnings():
      warnings.simplefilter('error', gguf_export.TypeFallbackWarning)   # none expected here
      gguf_export.export_gguf(nnx.merge(graphdef, params), path, file_type=file_type,
                              tokenizer=CharTokenizer())
  return path


def evaluate(model: str, teacher_dir: str, reference: str) -> dict:
  args = quantized.parser().parse_args([f'--model={model}', f'--teacher={teacher_dir}',
                                        f'--reference={reference}'])
  return quantized.evaluate(args)


COLUMNS = [('accuracy', 'jax', 'accuracy', '{:.3f}'), ('CE', 'jax', 'ce', '{:.3e}'),
           ('KL to teacher', 'jax', 'kl_teacher', '{:.3e}'),
           ('KL to fp32 student', 'jax', 'kl_reference', '{:.2e}'),
           ('top-1 = fp32 student', 'jax', 'top1_reference', '{:.4f}'),
           ('llama.cpp max abs logit diff', 'llama_cpp', 'max_abs_logit_diff_vs_jax', '{:.1e}')]


def _mean_sd(values, fmt: str) -> str:
  """mean ± sample standard deviation (n - 1) over seeds."""
  cell = fmt.format(np.mean(values))
  return cell + (' ± ' + fmt.format(np.std(values, ddof=1)) if len(values) > 1 else '')


def _by_seed(results: dict, student_name: str, file_type: str) -> dict:
  return {r['seed']: r for r in results['rows']
          if r['student'] == student_name and r['format'] == file_type}


def table(results: dict) -> str:
  """Markdown: mean ± SD over seeds per student and format."""
  groups: dict = {}
  for row in results['rows']:
    groups.setdefault((row['student'], row['format']), []).append(row)
  lines = ['| student | format | seeds | GGUF MiB | weights + KV 1k ctx MiB | ' +
           ' | '.join(c[0] for c in COLUMNS) + ' |', '|---|---|---:|---:|---:|' +
           '---:|' * len(COLUMNS)]
  for (student_name, file_type), rows in groups.items():
    memory = rows[0]['memory']
    size = memory.get('gguf_bytes')
    cells = [student_name, file_type, str(len(rows)), f'{size / 2**20:.3f}' if size else '-',
             f'{memory["total_bytes_1k_context"] / 2**20:.3f}']
    for _, column, key, fmt in COLUMNS:
      values = [r[column][key] for r in rows if key in r.get(column, {})]
      cells.append(_mean_sd(values, fmt) if values else '-')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def recovery(results: dict) -> str:
  """Markdown: per 4-bit type, what quantization costs the distilled student and what QAD wins
  back against the control (the same extra steps without quantization), paired by seed; then
  what quantizing costs each student against its own fp32 weights."""
  lines = ['| type | metric | distilled fp32 | distilled at type | control at type | '
           'QAD at type | control - QAD (paired) | per seed |',
           '|---|---|---:|---:|---:|---:|---:|---|']
  for file_type in QAD_TYPES:
    students = [_by_seed(results, 'distilled', 'fp32 (JAX)'),
                _by_seed(results, 'distilled', file_type),
                _by_seed(results, 'finetuned', file_type),
                _by_seed(results, f'qad_{file_type}', file_type)]
    seeds = sorted(set.intersection(*(set(s) for s in students)))
    if not seeds:
      continue
    for label, _, key, fmt in COLUMNS[:4]:
      values = [[s[seed]['jax'][key] for seed in seeds] for s in students]
      cells = [_mean_sd(v, fmt) for v in values]
      differences = np.subtract(values[2], values[3])
      cells += [_mean_sd(differences, fmt), ', '.join(fmt.format(d) for d in differences)]
      lines.append(f'| {file_type} | {label} | ' + ' | '.join(cells) + ' |')
  lines += ['', '| type | student | KL to teacher: at type - its own fp32 weights | per seed |',
            '|---|---|---:|---|']
  for file_type in QAD_TYPES:
    for student_name in ('distilled', 'finetuned', f'qad_{file_type}'):
      quantized, fp32 = (_by_seed(results, student_name, f) for f in (file_type, 'fp32 (JAX)'))
      seeds = sorted(set(quantized) & set(fp32))
      if seeds:
        costs = [quantized[s]['jax']['kl_teacher'] - fp32[s]['jax']['kl_teacher'] for s in seeds]
        lines.append(f'| {file_type} | {student_name} | {_mean_sd(costs, "{:.2e}")} | ' +
                     ', '.join(f'{c:.2e}' for c in costs) + ' |')
  return '\n'.join(lines)


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--workdir', default='')
  p.add_argument('--out', required=True)
  p.add_argument('--table_only', action='store_true', help='print the table of --out')
  p.add_argument('--seeds', type=int, default=3)
  p.add_argument('--teacher_steps', type=int, default=400)
  p.add_argument('--student_steps', type=int, default=300)
  p.add_argument('--finetune_steps', type=int, default=40)
  p.add_argument('--finetune_lr', type=float, default=3e-4)
  args = p.parse_args()
  if args.table_only:
    with open(args.out) as f:
      results = json.load(f)
    print(table(results), recovery(results), sep='\n\n')
    return
  start = time.time()
  teacher_dir, teacher_seconds = teacher(args)
  rows, times = [], {'teacher': teacher_seconds}
  for seed in range(args.seeds):
    base = os.path.join(args.workdir, f'seed{seed}', 'distilled')
    times[f'seed{seed}/distilled'] = _train(student_config(args, teacher_dir, seed,
                                                           args.student_steps), base)
    runs = {'distilled': (base, FORMATS)}
    for quant in (*QAD_TYPES, ''):
      name = f'qad_{quant}' if quant else 'finetuned'
      c = student_config(args, teacher_dir, seed, args.finetune_steps)
      c.model.init_from, c.quant.type = base, quant
      c.optimizer.learning_rate, c.optimizer.warmup_steps = args.finetune_lr, 0
      workdir = os.path.join(args.workdir, f'seed{seed}', name)
      times[f'seed{seed}/{name}'] = _train(c, workdir)
      runs[name] = (workdir, (quant,) if quant else QAD_TYPES)
    for name, (workdir, formats) in runs.items():
      for file_type in formats:
        out = evaluate(export(workdir, file_type), teacher_dir, base)
        rows.append({'seed': seed, 'student': name, 'format': file_type, **out})
        print(seed, name, file_type, json.dumps(out['jax']), flush=True)
      # Every student's fp32 master weights too: the control's separate what its extra steps
      # did from what quantizing it costs; a QAD student's show what it learnt off-grid.
      out = evaluate(workdir, teacher_dir, base)
      rows.append({'seed': seed, 'student': name, 'format': 'fp32 (JAX)', **out})
  results = {'args': vars(args), 'train_seconds': times,
             'total_seconds': time.time() - start, 'rows': rows}
  with open(args.out, 'w') as f:
    json.dump(results, f, indent=1)
  print(table(results), recovery(results), sep='\n\n')


if __name__ == '__main__':
  main()
