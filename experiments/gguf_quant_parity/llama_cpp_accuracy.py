"""Held-out arithmetic accuracy of a run's model as llama.cpp runs it, per GGUF type.

Converts WORKDIR (a finished run on the embedded arithmetic task) with
`python -m distill.convert to-gguf` once per type, loads each file with llama-cpp-python, and
greedily completes the first N problems of the task's eval split; a completion is right when
its answer after '#' is exact (distill.data.arithmetic.score). Also the mean KL(first type ||
this type) of llama.cpp's next-token distributions over the first 32 problems, teacher-forced
(prompt and reference completion), which shows a difference before accuracy does.

  python experiments/gguf_quant_parity/llama_cpp_accuracy.py --src WORKDIR [--n 256] \
      [--types f32,q8_0,q6_k,q5_k_m,q4_k_m,q4_0] [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import llama_cpp
import numpy as np

from distill import convert
from distill.data import arithmetic

KL_PROBLEMS = 32


def measure(path: str, problems: list[tuple[str, str]]) -> tuple[float, list[np.ndarray]]:
  """(greedy accuracy, per teacher-forced problem the log-probabilities [T, V])."""
  # fp32 KV cache: the file's weights are the only approximation measured.
  llm = llama_cpp.Llama(model_path=path, n_ctx=128, n_threads=1, verbose=False,
                        logits_all=True, type_k=0, type_v=0)
  right = 0.0
  for prompt, completion in problems:
    text = llm.create_completion(prompt, max_tokens=len(completion) + 1,
                                 temperature=0.0)['choices'][0]['text']
    right += arithmetic.score(prompt, text)
  logprobs = []
  for prompt, completion in problems[:KL_PROBLEMS]:
    tokens = llm.tokenize((prompt + completion).encode(), add_bos=True)
    llm.reset()
    llm.eval(tokens)
    logits_TxV = np.asarray(llm.scores[:len(tokens)], np.float64)
    logits_TxV -= logits_TxV.max(-1, keepdims=True)
    logprobs.append(logits_TxV - np.log(np.exp(logits_TxV).sum(-1, keepdims=True)))
  return right / len(problems), logprobs


def mean_kl(p_logprobs: list[np.ndarray], q_logprobs: list[np.ndarray]) -> float:
  """Mean over positions of KL(p || q) in nats."""
  return float(np.mean(np.concatenate([(np.exp(p) * (p - q)).sum(-1)
                                       for p, q in zip(p_logprobs, q_logprobs)])))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--src', required=True, help='a finished arithmetic run (model.json + params/)')
  p.add_argument('--n', type=int, default=256, help='eval problems')
  p.add_argument('--types', default='f32,q8_0,q6_k,q5_k_m,q4_k_m,q4_0')
  p.add_argument('--out', default=None, help='write the per-type result as JSON')
  args = p.parse_args(argv)
  with open(os.path.join(args.src, 'config.json')) as f:
    run_config = json.load(f)
  if run_config['task']['name'] != 'arithmetic':
    raise SystemExit(f'{args.src} is a run on {run_config["task"]["name"]!r}, not arithmetic')
  task = arithmetic.ArithmeticTask(**run_config['task']['kwargs'])
  problems = [task.example('eval', i) for i in range(args.n)]
  result, reference = {}, None
  with tempfile.TemporaryDirectory() as folder:
    for file_type in args.types.split(','):
      path = os.path.join(folder, f'{file_type}.gguf')
      if convert.main(['to-gguf', '--src', args.src, '--out', path, '--type', file_type]):
        raise SystemExit(f'conversion to {file_type} failed')
      acc, logprobs = measure(path, problems)
      reference = reference or logprobs
      result[file_type] = {'accuracy': acc, 'bytes': os.path.getsize(path),
                           'mean_kl_from_first_type': mean_kl(reference, logprobs)}
      print(f'{file_type:7s} {acc:.1%} of {args.n}, {os.path.getsize(path):,} bytes, mean KL '
            f'from the first type {result[file_type]["mean_kl_from_first_type"]:.2e}', flush=True)
  if args.out:
    with open(os.path.join(args.src, 'final_metrics.json')) as f:
      final_metrics = json.load(f)
    with open(args.out, 'w') as f:
      json.dump({'final_metrics': final_metrics, 'n': args.n, 'by_type': result}, f, indent=1)


if __name__ == '__main__':
  main()
