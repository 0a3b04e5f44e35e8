"""Sampling inside the jitted step, shared by the on-policy algorithms.

Everything here runs inside the one compiled step (the teacher stays a frozen input; no
[B, T, V] logits leave the step). Prompts are the first P = T - completion_len columns of
the batch (left-padded, so generation starts at column P for every row); completions are
turned back into rows of the standard batch layout with `sampling.training_batch`, so the
usual loss and step apply to them unchanged.

Helpers:
  SamplingAlgorithm      base class: kwargs with defaults checked by name, the sampling
                         config built and validated before compilation
  sample_rows            prompts of a batch completed by one model -> (rows, sample)
  joint_generate         decode loop running student and teacher KV caches together, for
                         rules that need both models per token (teacher-mixed, SKD)
  joint_sample_rows      prompts of a batch completed by joint_generate -> (rows, sample)
  score_samples          the teacher's log-probs of sampled rows, with the loss weights
  at_loss_columns        per-generated-token values [B, N] -> the rows' loss columns [B, T]
  target_logprobs        log q(target) per position, value only, a chunk of logits at a time
  weighted_loss          Σ weights·token_fn, plain or chunked as the config says
  policy_gradient_loss   REINFORCE surrogate Σ c·(−log q(target)) with c constant
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from distill import losses, sampling
from distill.algorithms.base import Algorithm
from distill.train import step as step_lib

SAMPLING_DEFAULTS = {'temperature': 1.0, 'top_k': 0, 'top_p': 1.0}


def is_real(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


class SamplingAlgorithm(Algorithm):
  """An algorithm whose step samples completions of the batch's prompts.

  Subclasses list their kwargs with defaults in DEFAULTS (the sampling ones included) and
  check their own in `check_options`; `self.options` holds the merged values and
  `self.sampling` the student's `SamplingConfig` once `validate()` has run.
  """
  DEFAULTS: dict = SAMPLING_DEFAULTS
  teacher_generates = False   # the teacher also samples with self.sampling

  def kwarg_error(self, name: str, problem: str) -> ValueError:
    return ValueError(f'config.algorithm.kwargs.{name} {problem} (algorithm '
                      f'{self.config.algorithm.name!r})')

  def validate(self) -> None:
    name = self.config.algorithm.name
    unknown = sorted(set(self.kwargs) - set(self.DEFAULTS))
    if unknown:
      raise ValueError(f'algorithm {name!r} does not take kwargs {unknown}; it takes '
                       f'{sorted(self.DEFAULTS)}')
    self.options = {**self.DEFAULTS, **self.kwargs}
    if self.run.teacher_params is None:
      raise ValueError(f'algorithm {name!r} needs a teacher: set config.teacher.checkpoint to '
                       'the workdir of a finished teacher run')
    c = self.config
    self.sampling = sampling.SamplingConfig(
        max_new_tokens=c.task.completion_len, temperature=self.options['temperature'],
        top_k=self.options['top_k'], top_p=self.options['top_p'],
        eos_id=self.run.tokenizer.eos_id, pad_id=self.run.tokenizer.pad_id)
    models = [self.run.model_config] + ([self.run.teacher_config] if self.teacher_generates else [])
    for model_config in models:
      try:
        sampling.validate_sampling(self.sampling, model_config, c.task.prompt_len)
      except ValueError as e:
        raise ValueError(f'algorithm {name!r}, sampling (config.algorithm.kwargs): {e}') from None
    self.check_options(self.options)

  def check_options(self, options: dict) -> None:
    """Checks the subclass's own kwargs (raise self.kwarg_error(...))."""


def prompts(batch: dict, completion_len: int):
  """(prompt_BxP, prompt_mask_BxP): the columns before generation starts."""
  prompt_len = batch['tokens'].shape[1] - completion_len
  return batch['tokens'][:, :prompt_len], batch['input_mask'][:, :prompt_len]


def sample_rows(graphdef, params, batch: dict, rng, cfg: sampling.SamplingConfig):
  """The batch's prompts completed by one model: (rows in the batch layout, the sample dict)."""
  prompt_BxP, prompt_mask_BxP = prompts(batch, cfg.max_new_tokens)
  sample = sampling.generate(graphdef, jax.lax.stop_gradient(params), prompt_BxP,
                             prompt_mask_BxP, rng, cfg)
  return sampling.training_batch(prompt_BxP, prompt_mask_BxP, sample, cfg.pad_id), sample


def joint_sample_rows(student_graphdef, student_params, teacher_graphdef, teacher_params,
                      batch: dict, rng, cfg: sampling.SamplingConfig, choose):
  """The batch's prompts completed by joint_generate with `choose`: (rows, sample)."""
  prompt_BxP, prompt_mask_BxP = prompts(batch, cfg.max_new_tokens)
  sample = joint_generate(student_graphdef, student_params, teacher_graphdef, teacher_params,
                          prompt_BxP, prompt_mask_BxP, rng, cfg, choose)
  return sampling.training_batch(prompt_BxP, prompt_mask_BxP, sample, cfg.pad_id), sample


class Scored(NamedTuple):
  """Sampled rows scored by the teacher (all [B, T] at the rows' loss columns, no gradient)."""
  log_sample_BxT: jax.Array   # log-prob of each token under the distribution that drew it
  log_p_BxT: jax.Array        # the teacher's log-prob of each sampled token
  teacher_h: jax.Array        # the teacher's final hidden states and output projection
  teacher_w: jax.Array
  mask_BxT: jax.Array         # the rows' loss mask
  weights_BxT: jax.Array      # losses.token_weights of the mask, and its normaliser
  normaliser: jax.Array

  @property
  def norm(self):
    """The normaliser, kept away from 0 for division."""
    return jnp.maximum(self.normaliser, 1e-9)


def score_samples(ctx, teacher_params, rows: dict, sample: dict) -> Scored:
  """What the policy-gradient algorithms need of the teacher and the sample, once per step."""
  teacher_h, teacher_w = jax.tree.map(jax.lax.stop_gradient, step_lib.model_outputs(
      ctx.teacher_graphdef, teacher_params, rows))
  weights_BxT, normaliser = losses.token_weights(rows['loss_mask'], ctx.reduction)
  return Scored(
      log_sample_BxT=at_loss_columns(sample['logprobs_BxN'], rows['tokens'].shape[1]),
      log_p_BxT=target_logprobs(teacher_h, teacher_w, rows['targets'], ctx.chunk_size),
      teacher_h=teacher_h, teacher_w=teacher_w, mask_BxT=rows['loss_mask'],
      weights_BxT=weights_BxT, normaliser=normaliser)


def at_loss_columns(values_BxN, seq_len: int):
  """Values of generated tokens [B, N] placed where the rows' loss_mask scores them.

  A row's generated token n is the target of column P - 1 + n (P = seq_len - N).
  """
  B, N = values_BxN.shape
  P = seq_len - N
  return jnp.concatenate([jnp.zeros((B, P - 1), values_BxN.dtype), values_BxN,
                          jnp.zeros((B, 1), values_BxN.dtype)], axis=1)


def joint_generate(student_graphdef, student_params, teacher_graphdef, teacher_params,
                   prompt_BxP, prompt_mask_BxP, rng, cfg: sampling.SamplingConfig, choose):
  """Decodes with the student's and the teacher's KV caches side by side.

  choose(rng, student_logits_BxV, teacher_logits_BxV) -> (token_B, logprob_B, flag_B) picks
  each step's token from both models' next-token logits (fp32); logprob is the token's
  log-probability under the rule's own sampling distribution, flag any per-token number the
  rule reports (e.g. 1 where the teacher replaced the student's token). Both models then
  consume the chosen token. Shapes and stopping follow `sampling.generate`: [B, N] outputs,
  a row stops after EOS (pad_id afterwards, mask 0), step i uses split(rng, N)[i].
  Returns tokens_BxN, mask_BxN, logprobs_BxN, flags_BxN (0 where mask is 0).
  """
  student = nnx.merge(student_graphdef, jax.lax.stop_gradient(student_params))
  teacher = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(teacher_params))
  B, P = prompt_BxP.shape
  N = cfg.max_new_tokens
  prompt_mask_BxP = prompt_mask_BxP.astype(jnp.int32)
  step_keys = jax.random.split(rng, N)
  caches, logits = [], []
  # Once, outside the loop.
  s_weights, t_weights = student.decoding_weights(), teacher.decoding_weights()
  for model, weights in ((student, s_weights), (teacher, t_weights)):
    cache = model.init_cache(B, P + N)
    last_BxV, cache = model.prefill(prompt_BxP, prompt_mask_BxP, cache, last_only=True,
                                    weights=weights)
    caches.append(cache)
    logits.append(last_BxV)

  def draw(i, s_logits, t_logits):
    return choose(step_keys[jnp.minimum(i, N - 1)], s_logits.astype(jnp.float32),
                  t_logits.astype(jnp.float32))

  # As in sampling.generate, the loop carries step i's draw rather than both models' logits.
  def body(carry):
    i, (token_B, logp_B, flag_B), (s_cache, t_cache), done_B, out = carry
    live_B = ~done_B
    token_B = jnp.where(live_B, token_B, cfg.pad_id).astype(jnp.int32)
    write = sampling.write_column
    out = {'tokens_BxN': write(out['tokens_BxN'], i, token_B),
           'mask_BxN': write(out['mask_BxN'], i, live_B),
           'logprobs_BxN': write(out['logprobs_BxN'], i, jnp.where(live_B, logp_B, 0.0)),
           'flags_BxN': write(out['flags_BxN'], i, jnp.where(live_B, flag_B, 0.0))}
    if cfg.eos_id is not None:
      done_B = done_B | (token_B == cfg.eos_id)
    s_logits, s_cache = student.decode_step(token_B[:, None], s_cache, weights=s_weights)
    t_logits, t_cache = teacher.decode_step(token_B[:, None], t_cache, weights=t_weights)
    return i + 1, draw(i + 1, s_logits, t_logits), (s_cache, t_cache), done_B, out

  def cond(carry):
    i, _, _, done_B, _ = carry
    return (i < N) & ~jnp.all(done_B)

  out = {'tokens_BxN': jnp.full((B, N), cfg.pad_id, jnp.int32),
         'mask_BxN': jnp.zeros((B, N), jnp.int32),
         'logprobs_BxN': jnp.zeros((B, N), jnp.float32),
         'flags_BxN': jnp.zeros((B, N), jnp.float32)}
  done_B = prompt_mask_BxP.sum(axis=1) == 0
  carry = (jnp.zeros((), jnp.int32), draw(0, *logits), tuple(caches), done_B, out)
  return jax.lax.while_loop(cond, body, carry)[-1]


def target_logprobs(h_BxTxD, w_DxV, targets_BxT, chunk_size: int = 0):
  """log softmax(h·W)[target] at every position [B, T] (fp32, no gradient).

  With chunk_size > 0 at most chunk_size positions' logits exist at once (memory flat in
  B·T·V, like the chunked loss).
  """
  B, T, D = h_BxTxD.shape
  h_NxD = jax.lax.stop_gradient(h_BxTxD).reshape(B * T, D).astype(jnp.float32)
  w_DxV = jax.lax.stop_gradient(w_DxV).astype(jnp.float32)

  def one(x):
    h_D, target = x
    logits_V = h_D @ w_DxV
    return logits_V[target] - jax.nn.logsumexp(logits_V)

  out_N = jax.lax.map(one, (h_NxD, targets_BxT.reshape(-1)), batch_size=chunk_size or B * T)
  return out_N.reshape(B, T)


def weighted_loss(ctx, student_h, student_w, teacher_h, teacher_w, targets_BxT, weights_BxT,
                  token_fn):
  """Σ weights·token_fn(student, teacher, targets), chunked when ctx.chunk_size > 0.

  Weights are constants (any sign); the gradient reaches the student's hidden states and
  output projection only.
  """
  weights_BxT = jax.lax.stop_gradient(weights_BxT)
  if ctx.chunk_size:
    total, _ = losses.chunked_loss(student_h, student_w, teacher_h, teacher_w, targets_BxT,
                                   weights_BxT, token_fn, chunk_size=ctx.chunk_size)
  else:
    total, _ = losses.plain_loss(student_h, student_w, teacher_h, teacher_w, targets_BxT,
                                 weights_BxT, token_fn)
  return total


def _negative_logprob(student_logits_NxV, teacher_logits_NxV, targets_N, mask_N=None):
  del teacher_logits_NxV
  return losses.cross_entropy(student_logits_NxV, targets_N, mask_N)


def policy_gradient_loss(ctx, student_h, student_w, targets_BxT, coef_BxT):
  """Σ c·(−log q(target)) with c held constant: its gradient is −Σ c·∇log q(target).

  So a loss −Σ c'·ratio·A with ratio = q/q_sample and A constant is trained through
  c = c'·ratio·A, since ∇ratio = ratio·∇log q. Its value is a surrogate, not the loss.
  """
  return weighted_loss(ctx, student_h, student_w, None, None, targets_BxT, coef_BxT,
                       _negative_logprob)


def require_reverse_kl(config, name: str) -> None:
  """Policy-gradient reverse KL is the whole objective: config.loss must say exactly that."""
  loss = config.loss
  if loss.divergence != 'reverse_kl':
    raise ValueError(f'{name} optimises reverse KL: set config.loss.divergence=reverse_kl '
                     f'(got {loss.divergence!r})')
  if loss.ce_weight or loss.kd_weight != 1 or loss.temperature != 1:
    raise ValueError(f'{name} trains on its own samples with an unscaled reverse KL: set '
                     f'config.loss.kd_weight=1, ce_weight=0, temperature=1 (got {loss.kd_weight}, '
                     f'{loss.ce_weight}, {loss.temperature}); the sampling temperature is '
                     'config.algorithm.kwargs.temperature')
