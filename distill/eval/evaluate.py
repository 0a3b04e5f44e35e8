"""Held-out evaluation of a student: the same loss code as training, plus task metrics.

Reports, over completion tokens of the eval split: cross-entropy and perplexity;
teacher–student KL in both directions (when a teacher is present); task accuracy by
greedy decoding through the KV cache (tasks with a grader); and, where the task knows
its true distribution (the HMM language), the exact per-token KL between truth and
student in both directions and the diversity of the student's samples.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from flax import nnx

from distill import losses, sampling
from distill.algorithms import teachers
from distill.data import pipeline
from distill.quant import student as quant_student


def _token_sums(student_logits, teacher_logits, batch):
  mask = batch['loss_mask']
  ce = losses.cross_entropy(student_logits, batch['targets'], mask)
  sums = {'ce': (ce * mask).sum(), 'count': mask.sum()}
  if teacher_logits is not None:
    for name in ('forward_kl', 'reverse_kl'):
      sums[f'kl_{name.split("_")[0]}'] = (losses.get(name)(student_logits, teacher_logits, mask)
                                          * mask).sum()
    sums['teacher_ce'] = (losses.cross_entropy(teacher_logits, batch['targets'], mask) * mask).sum()
  return sums


@functools.partial(jax.jit, static_argnums=(0, 1))
def _eval_batch(student_graphdef, teacher_graphdef, student_params, teacher_params, batch):
  logits = lambda g, p: nnx.merge(g, p)(batch['tokens'], batch['input_mask'])
  if teacher_graphdef is None:
    teacher_logits = None
  elif teachers.is_ensemble(teacher_graphdef):   # several teachers: their mixture (or route)
    teacher_logits = teachers.ensemble_logits(teacher_graphdef, teacher_params, batch)
  else:
    teacher_logits = logits(teacher_graphdef, teacher_params)
  return _token_sums(logits(student_graphdef, student_params), teacher_logits, batch)


def eval_batches(run) -> list[dict]:
  c = run.config
  it = pipeline.make_eval_iterator(
      run.task, run.tokenizer, batch_size=c.data.eval_batch_size,
      prompt_len=c.task.prompt_len, completion_len=c.task.completion_len,
      route=run.teacher_route)
  return [b for _, b in zip(range(c.eval.max_batches), it)]


def _generate(run, graphdef, params, batch, *, temperature: float, rng) -> np.ndarray:
  cfg = sampling.SamplingConfig(max_new_tokens=run.config.task.completion_len,
                                temperature=temperature, eos_id=run.tokenizer.eos_id,
                                pad_id=run.tokenizer.pad_id)
  fn = _generate_fn(graphdef, cfg)
  p = run.config.task.prompt_len
  out = fn(params, batch['tokens'][:, :p], batch['input_mask'][:, :p], rng)
  return out


@functools.lru_cache(maxsize=16)
def _generate_fn(graphdef, cfg):
  return sampling.make_generate_fn(graphdef, cfg)


def evaluate(run, graphdef, params, *, batches: list[dict] | None = None) -> dict[str, Any]:
  batches = eval_batches(run) if batches is None else batches
  # A quantization-aware run is evaluated as it will ship: its GGUF type's weights.
  params = quant_student.for_evaluation(run.config, run.model_config, params)
  totals: dict[str, float] = {}
  # A teacher with its own tokenizer reads other ids: no per-token KL to it on these rows.
  teacher_graphdef = None if run.teacher_tokenizer is not None else run.teacher_graphdef
  for batch in batches:
    sums = jax.device_get(_eval_batch(graphdef, teacher_graphdef, params, run.teacher_params,
                                      batch))
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  count = max(totals.pop('count'), 1.0)
  out = {k: v / count for k, v in totals.items()}
  out['perplexity'] = float(np.exp(out['ce']))
  if run.config.eval.generate and hasattr(run.task, 'score'):
    out['accuracy'] = _accuracy(run, graphdef, params, batches)
  if hasattr(run.task, 'next_token_logprobs'):
    out.update(_truth_metrics(run, graphdef, params, batches))
  return out


def _accuracy(run, graphdef, params, batches) -> float:
  scores = []
  p = run.config.task.prompt_len
  for batch in batches:
    generated = _generate(run, graphdef, params, batch, temperature=0.0,
                          rng=jax.random.PRNGKey(0))
    tokens = np.asarray(generated['tokens_BxN'])
    for row in range(tokens.shape[0]):
      if batch['loss_mask'][row].sum() == 0:   # padding row of the last batch
        continue
      prompt = run.tokenizer.decode(batch['tokens'][row, :p])
      scores.append(run.task.score(prompt, run.tokenizer.decode(tokens[row])))
  return float(np.mean(scores)) if scores else float('nan')


@functools.partial(jax.jit, static_argnums=0)
def _log_probs(graphdef, params, tokens, input_mask):
  return jax.nn.log_softmax(nnx.merge(graphdef, params)(tokens, input_mask), axis=-1)


def _exact_kl(logp_BxTxV: np.ndarray, logq_BxTxV: np.ndarray, mask_BxT: np.ndarray) -> float:
  """Token-mean KL(p‖q) over masked positions; p may contain -inf (impossible tokens)."""
  p = np.exp(logp_BxTxV)
  terms = np.where(p > 0, p * (logp_BxTxV - logq_BxTxV), 0.0).sum(-1)
  return float((terms * mask_BxT).sum() / max(mask_BxT.sum(), 1.0))


def _restrict_to_support(logq_BxTxV, logp_BxTxV):
  """The student renormalised over tokens the truth can emit, and the mass it puts elsewhere.

  A softmax is never exactly zero, so KL(student‖truth) over the full vocabulary is
  always infinite when the truth has zeros; the reverse KL is therefore reported on the
  truth's support, with the student's off-support mass as a separate number.
  """
  support = np.isfinite(logp_BxTxV)
  masked = np.where(support, logq_BxTxV, -np.inf)
  log_on_support = np.logaddexp.reduce(masked, axis=-1, keepdims=True)
  # A position with an empty support (padding, or after a token the truth cannot emit)
  # counts as entirely off support instead of producing NaN.
  has_support = support.any(axis=-1, keepdims=True)
  restricted = np.where(has_support, masked - np.where(has_support, log_on_support, 0.0), -np.inf)
  return restricted, np.where(has_support[..., 0], 1.0 - np.exp(log_on_support[..., 0]), 1.0)


def _truth_metrics(run, graphdef, params, batches) -> dict[str, float]:
  """Exact per-token KL to the truth: forward on true texts, reverse on student samples."""
  fwd, rev, invalid, samples = [], [], [], []
  p = run.config.task.prompt_len
  for i, batch in enumerate(batches):
    mask = np.asarray(batch['loss_mask'])
    logq = np.asarray(_log_probs(graphdef, params, batch['tokens'], batch['input_mask']), np.float64)
    logp = run.task.next_token_logprobs(np.asarray(batch['tokens']), np.asarray(batch['input_mask']))
    fwd.append((_exact_kl(logp, logq, mask), mask.sum()))

    gen = _generate(run, graphdef, params, batch, temperature=1.0, rng=jax.random.PRNGKey(i))
    rows = sampling.training_batch(batch['tokens'][:, :p], batch['input_mask'][:, :p], gen,
                                  pad_id=run.tokenizer.pad_id)
    rows = jax.device_get(rows)
    gen_mask = np.asarray(rows['loss_mask']) * (mask.sum(1, keepdims=True) > 0)
    logq = np.asarray(_log_probs(graphdef, params, rows['tokens'], rows['input_mask']), np.float64)
    logp = run.task.next_token_logprobs(np.asarray(rows['tokens']), np.asarray(rows['input_mask']))
    logq_on_support, outside = _restrict_to_support(logq, logp)
    rev.append((_exact_kl(logq_on_support, logp, gen_mask), gen_mask.sum()))
    invalid.append(((outside * gen_mask).sum() / max(gen_mask.sum(), 1.0), gen_mask.sum()))
    samples += [run.tokenizer.decode(t) for t, keep in zip(np.asarray(gen['tokens_BxN']),
                                                           mask.sum(1) > 0) if keep]
  # float(): the counts are numpy float32, which json (final_metrics.json) cannot write.
  weighted = lambda pairs: float(sum(v * n for v, n in pairs) /
                                 max(sum(n for _, n in pairs), 1.0))
  return {'truth_kl_forward': weighted(fwd), 'truth_kl_reverse': weighted(rev),
          'student_mass_off_support': weighted(invalid),
          'sample_distinct_fraction': len(set(samples)) / max(len(samples), 1)}
