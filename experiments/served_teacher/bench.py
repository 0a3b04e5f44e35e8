"""Served teacher vs in-process: training throughput of online top-k KD, the teacher's share
of the step, and what server-side batching does for concurrent requests.

    .venv/bin/python experiments/served_teacher/bench.py --out=experiments/served_teacher

1. A random tiny teacher (the arithmetic configs' 'tiny' preset) exported like a run.
2. Two servers, `python -m distill.serve`, each in its own process: --batch-wait-ms=0 (every
   request its own forward pass) and 5 (requests arriving together share one).
3. Concurrent scoring: distill.teacher_client sends R arithmetic rows as requests of
   --rows-per-request rows, --concurrency at a time, prompt_logprobs=16; rows/s per server
   (best of --repeats, after a warm-up that compiles the shapes).
4. Training: configs/arithmetic_cached.py:small,online (topk_online, 16 rows x 42 tokens,
   k=16) for --steps steps in-process and against each server; tokens/s and the served
   runs' teacher_s / teacher_share (distill.train.monitor: the loop's wait for the top-k; in
   process, the teacher's forward timed on its own) averaged over the logs after the first
   (which includes compilation).
Writes results.json and results.md into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import requests

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from distill import teacher_client  # noqa: E402
from distill.data import pipeline, tasks  # noqa: E402
from distill.data.tokenizer import CharTokenizer  # noqa: E402
from distill.models import get_preset, sharded  # noqa: E402
from distill.train import teacher as teacher_lib  # noqa: E402


def export_teacher(workdir: str, preset: str) -> str:
  model_config = get_preset(preset, vocab_size=CharTokenizer().vocab_size)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: (0.3 * rng.standard_normal(a.shape)).astype(a.dtype),
                        sharded.abstract_model(model_config)[1])
  teacher_lib.export_final(workdir, model_config, params)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump({'tokenizer': ''}, f)
  return workdir


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start_server(teacher: str, wait_ms: float) -> tuple[subprocess.Popen, str]:
  port = free_port()
  proc = subprocess.Popen([sys.executable, '-m', 'distill.serve', f'--model={teacher}',
                           f'--port={port}', '--max-logprobs=64', f'--batch-wait-ms={wait_ms}'],
                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f'http://127.0.0.1:{port}'
  for _ in range(600):
    try:
      requests.get(url + '/health', timeout=1)
      return proc, url
    except requests.ConnectionError:
      time.sleep(0.5)
  raise RuntimeError(f'server at {url} did not start')


def sequences(n: int) -> list[list[int]]:
  task, tokenizer = tasks.get_task('arithmetic'), CharTokenizer()
  prompt_len, completion_len = tasks.sequence_lengths(task)
  rows = pipeline.make_dataset(task, tokenizer, split='train', seed=0, prompt_len=prompt_len,
                               completion_len=completion_len, shuffle=False)
  return [rows[i]['tokens'][rows[i]['input_mask'] != 0].tolist() for i in range(n)]


def scoring_rows_per_s(url: str, seqs, *, rows_per_request: int, concurrency: int,
                       repeats: int) -> float:
  client = teacher_client.TeacherClient(url, options=teacher_client.ClientOptions(
      rows_per_request=rows_per_request, concurrency=concurrency))
  client.connect()
  for _ in range(2):   # warm-up: compiles the shapes this load makes (batches vary in size)
    client.prompt_topk(seqs, 16)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    client.prompt_topk(seqs, 16)
    times.append(time.perf_counter() - start)
  return len(seqs) / min(times)


def train(workdir: str, steps: int, *extra) -> dict:
  cmd = [sys.executable, '-m', 'distill.main', '--config=configs/arithmetic_cached.py:small,online',
         f'--workdir={workdir}', f'--config.total_steps={steps}', '--config.log_steps=10',
         f'--config.checkpoint_steps={steps}', '--config.eval.generate=False',
         '--config.mesh.data=1', *extra]
  subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    logs = [r for r in map(json.loads, f) if 'tokens_per_s' in r][1:]   # the first compiles
  mean = lambda key: statistics.mean(r[key] for r in logs) if key in logs[0] else None
  return {'tokens_per_s': mean('tokens_per_s'), 'teacher_s': mean('teacher_s'),
          'teacher_share': mean('teacher_share'), 'teacher_request_s': mean('teacher_request_s')}


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument('--out', default=os.path.dirname(os.path.abspath(__file__)))
  p.add_argument('--rows', type=int, default=256)
  p.add_argument('--rows-per-request', type=int, default=4)
  p.add_argument('--concurrency', type=int, default=8)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--steps', type=int, default=41)
  p.add_argument('--preset', default='tiny', help="the teacher's size preset")
  p.add_argument('--scoring-only', action='store_true', help='skip the training runs')
  args = p.parse_args(argv)
  root = tempfile.mkdtemp(prefix='served-bench-')
  teacher = export_teacher(os.path.join(root, 'teacher'), args.preset)
  seqs = sequences(args.rows)
  results = {'teacher_preset': args.preset, 'rows': args.rows,
             'rows_per_request': args.rows_per_request, 'concurrency': args.concurrency,
             'steps': args.steps, 'scoring_rows_per_s': {}, 'training': {}}
  # The probe times the in-process teacher's forward (the served wait is always measured).
  if not args.scoring_only:
    results['training']['in_process'] = train(os.path.join(root, 'in_process'), args.steps,
                                              f'--config.teacher.checkpoint={teacher}',
                                              '--config.monitor.probe=True')
  for wait_ms in (0.0, 5.0):
    proc, url = start_server(teacher, wait_ms)
    try:
      name = f'batch_wait_ms={wait_ms:g}'
      results['scoring_rows_per_s'][name] = scoring_rows_per_s(
          url, seqs, rows_per_request=args.rows_per_request, concurrency=args.concurrency,
          repeats=args.repeats)
      if not args.scoring_only:
        results['training'][f'served, {name}'] = train(os.path.join(root, name), args.steps,
                                                       f'--config.teacher.server={url}')
    finally:
      proc.terminate()
      proc.wait()
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  lines = [f'Teacher preset {args.preset}.', '',
           '| teacher | tokens/s | teacher_s per step | teacher_share | request s per batch |',
           '|---|---|---|---|---|']
  fmt = lambda v, spec: '—' if v is None else format(v, spec)
  for name, r in results['training'].items():
    lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {fmt(r['teacher_s'], '.3f')} | "
                 f"{fmt(r['teacher_share'], '.2f')} | {fmt(r['teacher_request_s'], '.3f')} |")
  lines += ['', f'Concurrent scoring ({args.rows} rows, {args.rows_per_request} rows per request, '
            f'{args.concurrency} in flight, k=16):', '']
  lines += [f'- {name}: {v:.0f} rows/s' for name, v in results['scoring_rows_per_s'].items()]
  with open(os.path.join(args.out, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
