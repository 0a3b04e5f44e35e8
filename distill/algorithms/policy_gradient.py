"""Reverse KL by policy gradient on sampled rows: the shared parts, and the per-token form.

`PolicyGradient` is the base of the objectives that minimise KL(q‖p) over the student's own
sequences by REINFORCE-style surrogates (on-policy reverse KL here, MiniLLM in minillm.py):
they need sampled rows (the log-probability of each token under the distribution that drew
it), score the sampled tokens with the teacher once per step, outside the gradient
(`prepare`), and train through Σ c·(−log q(target)) with constant coefficients c.

`ReverseKLPerToken` — on-policy distillation with per-token reverse-KL rewards (as in Qwen3
and Thinking Machines' "on-policy distillation"): each sampled token's advantage is
A_t = −(log q(y_t) − log p(y_t)) (a constant), and the loss
    L = −Σ_t ratio_t · A_t  (reduced as config.loss.reduction says)
with the importance ratio ratio_t = q_θ(y_t) / q_sample(y_t) to the distribution that drew
the token. Sampling in the same step from the same parameters makes the ratio 1 in value at
temperature 1 (its gradient is ∇log q), so the gradient is REINFORCE with the per-token
reward; with another sampling temperature, top-k or top-p the ratio corrects for the
sampling distribution. No full-vocabulary divergence is computed.
That per-token reward (kwarg reward_to_go=False, the default, as in the on-policy distillation
post's discount of zero) makes the expected gradient Σ_t E[∇KL(q(·|y<t)‖p(·|y<t))] with no
gradient through the prefixes' distribution: biased for KL(q‖p) over whole sequences by the
future tokens' term. reward_to_go=True uses A_t = Σ_{t'≥t} (log p − log q)(y_t') instead, the
unbiased REINFORCE estimate of the sequence-level ∇KL(q‖p) when sampling at temperature 1
without top-k/top-p (the per-token ratio does not reweight the future tokens), at the price of
a noisier estimate; tests/test_estimators.py checks both by exact enumeration.
Metrics: reverse_kl_estimate (mean of log q − log p over sampled tokens), ratio,
sample_length.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from distill import losses
from distill.algorithms import divergence, hooks
from distill.models import layers


def at_loss_columns(values_BxN, seq_len: int):
  """Values of generated tokens [B, N] placed where the rows' loss_mask scores them.

  A row's generated token n is the target of column P - 1 + n (P = seq_len - N).
  """
  B, N = values_BxN.shape
  P = seq_len - N
  return jnp.concatenate([jnp.zeros((B, P - 1), values_BxN.dtype), values_BxN,
                          jnp.zeros((B, 1), values_BxN.dtype)], axis=1)


def target_logprobs(h_BxTxD, w_DxV, targets_BxT, chunk_size: int = 0, softcap: float = 0.0):
  """log softmax(h·W)[target] at every position [B, T] (fp32, no gradient); the logits
  soft-capped first when softcap > 0.

  With chunk_size > 0 at most chunk_size positions' logits exist at once (memory flat in
  B·T·V, like the chunked loss).
  """
  B, T, D = h_BxTxD.shape
  h_NxD = jax.lax.stop_gradient(h_BxTxD).reshape(B * T, D).astype(jnp.float32)
  w_DxV = jax.lax.stop_gradient(w_DxV).astype(jnp.float32)

  def one(x):
    h_D, target = x
    logits_V = h_D @ w_DxV
    if softcap:
      logits_V = layers.softcap(logits_V, softcap)
    return logits_V[target] - jax.nn.logsumexp(logits_V)

  out_N = jax.lax.map(one, (h_NxD, targets_BxT.reshape(-1)), batch_size=chunk_size or B * T)
  return out_N.reshape(B, T)


def _negative_logprob(student_logits_NxV, teacher_logits_NxV, targets_N, mask_N=None):
  del teacher_logits_NxV
  return losses.cross_entropy(student_logits_NxV, targets_N, mask_N)


def policy_gradient_loss(ctx, student_h, student_w, targets_BxT, coef_BxT):
  """Σ c·(−log q(target)) with c held constant: its gradient is −Σ c·∇log q(target).

  So a loss −Σ c'·ratio·A with ratio = q/q_sample and A constant is trained through
  c = c'·ratio·A, since ∇ratio = ratio·∇log q. Its value is a surrogate, not the loss.
  """
  return divergence.weighted_loss(ctx, student_h, student_w, None, None, targets_BxT,
                                  coef_BxT, _negative_logprob)


class Scored(NamedTuple):
  """Sampled rows scored by the teacher (all [B, T] at the rows' loss columns, no gradient)."""
  log_sample_BxT: jax.Array   # log-prob of each token under the distribution that drew it
  log_p_BxT: jax.Array        # the teacher's log-prob of each sampled token
  teacher_h: jax.Array        # the teacher's final hidden states and output projection
  teacher_w: jax.Array
  mask_BxT: jax.Array         # the rows' loss mask
  weights_BxT: jax.Array      # losses.token_weights of the mask, and its normaliser
  normaliser: jax.Array
  sample_length: tuple        # (generated tokens, rows): the sample_length metric

  @property
  def norm(self):
    """The normaliser, kept away from 0 for division."""
    return jnp.maximum(self.normaliser, 1e-9)


class PolicyGradient(hooks.Objective):
  """Base: reverse KL on the student's samples, the teacher's scores computed once a step."""
  accepts = ('reverse_kl',)
  needs_sample = True

  def check(self) -> None:
    loss = self.config.loss
    if loss.ce_weight or loss.kd_weight != 1 or loss.temperature != 1:
      raise ValueError(f'algorithm {self.config.algorithm.name!r} trains on its own samples '
                       f'with an unscaled reverse KL: set config.loss.kd_weight=1, ce_weight=0, '
                       f'temperature=1 (got {loss.kd_weight}, {loss.ce_weight}, '
                       f'{loss.temperature}); the sampling temperature is '
                       'config.algorithm.kwargs.temperature')

  def check_rows(self, rows) -> None:
    if rows.sampling.temperature == 0:
      raise self.kwarg_error('temperature', 'must be > 0: importance weights need a sampling '
                             'distribution, greedy decoding has none')

  def teacher_scores(self, ctx, teacher_params, rows):
    """(the teacher's log-prob of each target [B, T], its final hidden states, its output
    projection): from the in-process teacher; a served teacher's log-probs come with the
    rows instead (distill.algorithms.served_scoring)."""
    teacher_h, teacher_w = divergence.teacher_outputs(ctx, teacher_params, rows)
    log_p_BxT = target_logprobs(teacher_h, teacher_w, rows['targets'], ctx.chunk_size,
                                ctx.teacher_softcap)
    return log_p_BxT, teacher_h, teacher_w

  def prepare(self, ctx, teacher_params, drawn, state) -> Scored:
    del state
    rows, sample = drawn.rows, drawn.sample
    log_p_BxT, teacher_h, teacher_w = self.teacher_scores(ctx, teacher_params, rows)
    weights_BxT, normaliser = losses.token_weights(rows['loss_mask'], ctx.reduction)
    mask_BxT = rows['loss_mask']
    return Scored(
        log_sample_BxT=at_loss_columns(sample['logprobs_BxN'], rows['tokens'].shape[1]),
        log_p_BxT=log_p_BxT, teacher_h=teacher_h, teacher_w=teacher_w, mask_BxT=mask_BxT,
        weights_BxT=weights_BxT, normaliser=normaliser,
        sample_length=(sample['mask_BxN'].sum().astype(jnp.float32),
                       jnp.float32(mask_BxT.shape[0])))


class ReverseKLPerToken(PolicyGradient):
  """−Σ ratio·A with A = log p − log q per sampled token, or its sum over the tokens from
  this one on with reward_to_go (see the module doc)."""
  DEFAULTS = {'reward_to_go': False}

  def check(self) -> None:
    super().check()
    self.boolean('reward_to_go')

  def loss(self, ctx, params, trainable, scored: Scored, drawn, state):
    del trainable, state
    rows = drawn.rows
    student_h, student_w = hooks.model_outputs(ctx.student_graphdef, params, rows)
    log_q_BxT = target_logprobs(student_h, student_w, rows['targets'], ctx.chunk_size,
                                ctx.student_softcap)
    mask_BxT, weights_BxT = scored.mask_BxT, scored.weights_BxT
    valid = mask_BxT > 0
    ratio_BxT = jnp.where(valid, jnp.exp(log_q_BxT - scored.log_sample_BxT), 0.0)
    reward_BxT = jnp.where(valid, scored.log_p_BxT - log_q_BxT, 0.0)
    advantage_BxT = reward_BxT
    if self.options['reward_to_go']:
      advantage_BxT = jnp.where(valid, jnp.flip(jnp.cumsum(jnp.flip(reward_BxT, 1), 1), 1), 0.0)
    surrogate = policy_gradient_loss(ctx, student_h, student_w, rows['targets'],
                                     ratio_BxT * advantage_BxT * weights_BxT / scored.norm)
    n = mask_BxT.sum()
    metrics = {
        'loss': (-(ratio_BxT * advantage_BxT * weights_BxT).sum(), scored.normaliser),
        'reverse_kl_estimate': (-(reward_BxT * mask_BxT).sum(), n),
        'ratio': ((ratio_BxT * mask_BxT).sum(), n),
        'sample_length': scored.sample_length,
        'tokens': (n, jnp.float32(1.0)),
    }
    return surrogate, metrics
