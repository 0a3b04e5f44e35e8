"""`python -m distill.evaluate`: what quantization costs a student, in JAX and in llama.cpp.

    python -m distill.evaluate --model=student-q4_k_m.gguf --teacher=runs/teacher \
        --reference=runs/student [--out=metrics.json]

--model is a GGUF file (evaluated from its dequantized weights, distill.eval.gguf_model) or a
finished run's workdir. The task and evaluation settings come from the first run config among
--task_from, --model, --reference and --teacher. Reported, over the task's held-out rows
(distill.eval.evaluate, the in-training evaluator, plus top-1 agreement):
  accuracy, ce, perplexity                      the model on the task
  kl_teacher, top1_teacher                      KL(teacher || model) and argmax agreement
  kl_reference, top1_reference                  the same against --reference (the unquantized
                                                student), per completion token
  gguf_bytes, weights_bytes, kv_bytes_per_1k    file size; device memory: weights as stored plus
                                                an f16 KV cache per 1,000 tokens (llama.cpp's
                                                default; K and V, every layer, kv heads x head dim)
and, when llama-cpp-python is installed and --model is a GGUF, a llama.cpp column: the same rows
teacher-forced through llama.cpp, its CE and top-1 agreement with the teacher, and its agreement
with the JAX logits (max |logit difference| over completion positions). Without it the column
says why it is empty.

A GGUF whose vocabulary is not the teacher's (without --teacher: the task's tokenizer) is refused
before anything loads or compiles, naming the first differing token and both fingerprints.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile

import jax
import ml_collections
import gguf
import numpy as np

from distill import provenance
from distill.data.hf_tokenizer import HFTokenizer
from distill.data.tokenizer import CharTokenizer
from distill.eval import evaluate as eval_lib
from distill.eval import gguf_model
from distill.train import config as config_lib
from distill.train import run as run_lib
from distill.train import teacher as teacher_lib

KV_BYTES = 2   # llama.cpp's default KV cache type is f16


def _run_config(path: str) -> dict | None:
  config_json = os.path.join(path, 'config.json')
  if not (os.path.isdir(path) and teacher_lib.has_export(path) and os.path.isfile(config_json)):
    return None
  with open(config_json) as f:
    return json.load(f)


def _merge(config: ml_collections.ConfigDict, values: dict):
  """The keys of a saved run config that the current schema knows, set on `config`."""
  for key, value in values.items():
    if key not in config:
      continue
    if isinstance(config[key], ml_collections.ConfigDict) and isinstance(value, dict):
      if key in ('kwargs', 'hparams'):
        config[key] = ml_collections.ConfigDict(value, type_safe=False)
      else:
        _merge(config[key], value)
    else:
      try:
        config[key] = value
      except TypeError:   # a field whose type changed since the run; keep the default
        pass


def eval_config(args) -> ml_collections.ConfigDict:
  """The evaluation's run config: task and eval settings of a run, this tool's models."""
  sources = [args.task_from, args.model, args.reference, args.teacher]
  saved = next((c for c in map(_run_config, filter(None, sources)) if c), None)
  if saved is None:
    raise ValueError('no run config to take the task from: pass a run workdir as --model, '
                     '--reference, --teacher or --task_from')
  config = config_lib.base_config()
  _merge(config, saved)
  # Only the weights given here are evaluated, as they are (no fake quantization on top).
  config.role, config.quant.type, config.model.init_from = 'student', '', ''
  config.teacher.checkpoint, config.teacher.server = args.teacher or '', ''
  config.loss.kd_weight = 1.0 if args.teacher else 0.0
  if args.max_batches:
    config.eval.max_batches = args.max_batches
  return config


@functools.partial(jax.jit, static_argnums=(0, 1))
def _top1(graphdef, other_graphdef, params, other_params, batch):
  """(rows where the two models' argmax agree, rows) over completion tokens."""
  from flax import nnx
  logits = lambda g, p: nnx.merge(g, p)(batch['tokens'], batch['input_mask'])
  same = logits(graphdef, params).argmax(-1) == logits(other_graphdef, other_params).argmax(-1)
  mask = batch['loss_mask']
  return (same * mask).sum(), mask.sum()


def compare(run, graphdef, params, other_graphdef, other_params, batches) -> dict:
  """KL(other || model) and top-1 agreement per completion token."""
  kl = agree = count = 0.0
  for batch in batches:
    sums = jax.device_get(eval_lib._eval_batch(graphdef, other_graphdef, params, other_params,
                                               batch))
    same, n = jax.device_get(_top1(graphdef, other_graphdef, params, other_params, batch))
    kl, agree, count = kl + float(sums['kl_forward']), agree + float(same), count + float(n)
  count = max(count, 1.0)
  return {'kl': kl / count, 'top1': agree / count}


def device_memory(cfg, weights_bytes: int) -> dict:
  kv_per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.resolved_head_dim * KV_BYTES
  return {'weights_bytes': int(weights_bytes), 'kv_bytes_per_1k': 1000 * kv_per_token,
          'total_bytes_1k_context': int(weights_bytes) + 1000 * kv_per_token}


def llama_cpp_column(path: str, run, batches, jax_logits_fn) -> dict:
  """The rows teacher-forced through llama.cpp; {'skipped': why} when it cannot run."""
  try:
    import llama_cpp
  except ImportError:
    return {'skipped': "llama-cpp-python is not installed (pip install 'distill[llama]')"}
  llm = llama_cpp.Llama(model_path=path, n_ctx=run.seq_len + 8, logits_all=True, verbose=False,
                        n_threads=max(1, (os.cpu_count() or 2) // 2))
  diffs, ce, agree_jax, agree_teacher, count = [], 0.0, 0.0, 0.0, 0.0
  for batch in batches:
    jax_logits, teacher_logits = jax_logits_fn(batch)
    tokens, input_mask, loss_mask = (np.asarray(batch[k]) for k in
                                     ('tokens', 'input_mask', 'loss_mask'))
    for row in range(tokens.shape[0]):
      positions = np.nonzero(input_mask[row])[0]
      if loss_mask[row].sum() == 0 or len(positions) == 0:
        continue
      start, end = positions[0], positions[-1] + 1   # left-padded prompts
      llm.reset()
      llm.eval([int(t) for t in tokens[row, start:end]])
      logits = np.asarray(llm.scores[:end - start], np.float32)
      mask = loss_mask[row, start:end] > 0
      ours = np.asarray(jax_logits[row, start:end])[mask]
      theirs = logits[mask]
      diffs.append(np.abs(ours - theirs).max())
      targets = np.asarray(batch['targets'])[row, start:end][mask]
      logp = theirs - np.logaddexp.reduce(theirs, -1, keepdims=True)
      ce -= logp[np.arange(len(targets)), targets].sum()
      agree_jax += (theirs.argmax(-1) == ours.argmax(-1)).sum()
      if teacher_logits is not None:
        agree_teacher += (theirs.argmax(-1) ==
                          np.asarray(teacher_logits[row, start:end])[mask].argmax(-1)).sum()
      count += mask.sum()
  count = max(count, 1.0)
  out = {'llama_cpp_version': llama_cpp.__version__, 'ce': ce / count,
         'perplexity': float(np.exp(ce / count)), 'top1_jax': agree_jax / count,
         'max_abs_logit_diff_vs_jax': float(max(diffs)) if diffs else float('nan')}
  if teacher_logits is not None:
    out['top1_teacher'] = agree_teacher / count
  return out


def _tokenizer(name: str):
  return HFTokenizer(name) if name else CharTokenizer()


def teacher_tokenizer(args, config: ml_collections.ConfigDict):
  """(tokenizer, whose): the teacher's — its run's config.tokenizer, or a Hugging Face folder's
  tokenizer.json — or, without --teacher, the one the evaluation's rows are tokenized with."""
  if args.teacher:
    saved_path = os.path.join(args.teacher, 'config.json')
    saved = None
    if os.path.isfile(saved_path):
      with open(saved_path) as f:
        saved = json.load(f)
    if saved and 'task' in saved and 'tokenizer' in saved:   # a run of this framework
      return _tokenizer(saved['tokenizer']), "the teacher's"
    if os.path.isfile(os.path.join(args.teacher, 'tokenizer.json')):
      return _tokenizer(args.teacher), "the teacher's"
  return _tokenizer(config.tokenizer), "the evaluation task's"


def evaluate(args) -> dict:
  config = eval_config(args)
  is_gguf = os.path.isfile(args.model)
  if is_gguf:   # before anything loads or compiles
    gguf_model.check_tokenizer(args.model, *teacher_tokenizer(args, config))
  with tempfile.TemporaryDirectory() as workdir:
    run = run_lib.build_run(config, workdir)
  reference = None
  if args.reference:
    reference = teacher_lib.load_exported(args.reference, run.mesh)
  if is_gguf:
    graphdef, params, cfg = gguf_model.load_gguf(
        args.model, model_config=reference[2] if reference else None)
    weights_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(args.model).tensors)
  else:
    graphdef, params, cfg = teacher_lib.load_exported(args.model, run.mesh)
    weights_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  run.model_config = cfg
  batches = eval_lib.eval_batches(run)
  out = {'model': args.model, 'jax': {}, 'memory': device_memory(cfg, weights_bytes)}
  if is_gguf:
    out['memory']['gguf_bytes'] = os.path.getsize(args.model)
  metrics = eval_lib.evaluate(run, graphdef, params, batches=batches)
  jax_col = {k: metrics[k] for k in ('accuracy', 'ce', 'perplexity') if k in metrics}
  if run.teacher_params is not None:
    jax_col['kl_teacher'] = metrics['kl_forward']
    jax_col['top1_teacher'] = compare(run, graphdef, params, run.teacher_graphdef,
                                      run.teacher_params, batches)['top1']
  if reference is not None:
    vs_reference = compare(run, graphdef, params, reference[0], reference[1], batches)
    jax_col['kl_reference'], jax_col['top1_reference'] = vs_reference['kl'], vs_reference['top1']
  out['jax'] = jax_col
  if is_gguf and not args.no_llama_cpp:
    def logits_of(batch):
      from flax import nnx
      student = nnx.merge(graphdef, params)(batch['tokens'], batch['input_mask'])
      teacher = (None if run.teacher_params is None else
                 nnx.merge(run.teacher_graphdef, run.teacher_params)(batch['tokens'],
                                                                     batch['input_mask']))
      return student, teacher
    out['llama_cpp'] = llama_cpp_column(args.model, run, batches, logits_of)
  else:
    out['llama_cpp'] = {'skipped': 'only a GGUF model runs in llama.cpp' if not is_gguf
                        else '--no_llama_cpp'}
  record = provenance.read(args.model) if is_gguf or os.path.isdir(args.model) else None
  if record:
    out['provenance'] = record.get('summary')
  return out


def table(out: dict) -> str:
  rows = sorted(set(out['jax']) | set(out['llama_cpp']) - {'skipped'})
  lines = [f'{"metric":<28}{"jax (dequantized)":>20}{"llama.cpp":>20}']
  fmt = lambda v: f'{v:>20.6g}' if isinstance(v, float) else f'{str(v):>20}'
  for key in rows:
    lines.append(f'{key:<28}{fmt(out["jax"].get(key, "")) }{fmt(out["llama_cpp"].get(key, ""))}')
  if 'skipped' in out['llama_cpp']:
    lines.append(f'llama.cpp column empty: {out["llama_cpp"]["skipped"]}')
  for key, value in out['memory'].items():
    lines.append(f'{key:<28}{value / 2**20:>19.3f}M')
  if out.get('provenance'):
    lines.append(f'provenance: {out["provenance"]}')
  return '\n'.join(lines)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m distill.evaluate', description=__doc__.split('\n')[0])
  p.add_argument('--model', required=True, help='STUDENT.gguf or a finished run workdir')
  p.add_argument('--teacher', default='', help='teacher run workdir or Hugging Face folder')
  p.add_argument('--reference', default='',
                 help='the unquantized student (run workdir): KL and top-1 agreement to it')
  p.add_argument('--task_from', default='', help='a run workdir whose task to evaluate on')
  p.add_argument('--max_batches', type=int, default=0, help='eval batches (0: the run\'s)')
  p.add_argument('--no_llama_cpp', action='store_true', help='skip the llama.cpp column')
  p.add_argument('--out', default='', help='also write the results as JSON here')
  return p


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  try:
    out = evaluate(args)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(table(out))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(out, f, indent=1)
  return 0
