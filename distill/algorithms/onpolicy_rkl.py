"""On-policy distillation with per-token reverse-KL rewards (as in Qwen3 and Thinking
Machines' "on-policy distillation").

The student samples completions of the batch's prompts; the teacher scores only the sampled
tokens. Each token's advantage is A_t = −(log q(y_t) − log p(y_t)) (a constant), and the loss
    L = −Σ_t ratio_t · A_t  (reduced as config.loss.reduction says)
with the importance ratio ratio_t = q_θ(y_t) / q_sample(y_t) to the distribution that drew
the token, taken from the sampler's log-probabilities. Sampling in the same step from the
same parameters makes the ratio 1 in value at temperature 1 (its gradient is ∇log q), so
the gradient is the REINFORCE estimate of ∇KL(q‖p) with the per-token reward; with another
sampling temperature, top-k or top-p the ratio corrects for the sampling distribution.
No full-vocabulary divergence is computed: the policy-gradient surrogate goes through the
(chunked, when config.loss.chunk_size > 0) loss as Σ c·(−log q(y_t)).

kwargs: sampling temperature (> 0) / top_k / top_p. config.loss must be plain reverse KL.
Metrics: reverse_kl_estimate (mean of log q − log p over sampled tokens), ratio,
sample_length.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from distill.algorithms import rollout
from distill.train import step as step_lib


class OnPolicyReverseKL(rollout.SamplingAlgorithm):

  def check_options(self, o: dict) -> None:
    if o['temperature'] == 0:
      raise self.kwarg_error('temperature', 'must be > 0: the importance ratio needs a sampling '
                             'distribution, greedy decoding has none')
    rollout.require_reverse_kl(self.config, 'on-policy reverse KL')

  def step(self, ctx: step_lib.StepContext, state, teacher_params, batch):
    rows, sample = rollout.sample_rows(ctx.student_graphdef, state['params'], batch,
                                       step_lib.step_rng(state), self.sampling)
    scored = rollout.score_samples(ctx, teacher_params, rows, sample)
    log_sample_BxT, log_p_BxT, mask_BxT = (scored.log_sample_BxT, scored.log_p_BxT,
                                           scored.mask_BxT)
    weights_BxT, normaliser, norm = scored.weights_BxT, scored.normaliser, scored.norm

    def loss_fn(params):
      student_h, student_w = step_lib.model_outputs(ctx.student_graphdef, params, rows)
      log_q_BxT = rollout.target_logprobs(student_h, student_w, rows['targets'], ctx.chunk_size)
      valid = mask_BxT > 0
      ratio_BxT = jnp.where(valid, jnp.exp(log_q_BxT - log_sample_BxT), 0.0)
      advantage_BxT = jnp.where(valid, log_p_BxT - log_q_BxT, 0.0)
      surrogate = rollout.policy_gradient_loss(ctx, student_h, student_w, rows['targets'],
                                               ratio_BxT * advantage_BxT * weights_BxT / norm)
      loss_sum = -(ratio_BxT * advantage_BxT * weights_BxT).sum()
      n = mask_BxT.sum()
      metrics = {
          'loss': (loss_sum, normaliser),
          'reverse_kl_estimate': (-(advantage_BxT * mask_BxT).sum(), n),
          'ratio': ((ratio_BxT * mask_BxT).sum(), n),
          'sample_length': (sample['mask_BxN'].sum().astype(jnp.float32),
                            jnp.float32(mask_BxT.shape[0])),
          'tokens': (n, jnp.float32(1.0)),
      }
      return surrogate, metrics

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state['params'])
    return step_lib.apply_gradients(ctx, state, grads, metrics)
